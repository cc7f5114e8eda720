"""Record shapes as formatters: each turns one record of a user's dataset into a
conversation, a preference pair or a judged answer (``records.py``).

The built-in shapes are registered formatters of one ``FormatterFactory``; a deployment
adds its own by naming them in the config (``dataset_formatters: ["pkg.module:Class"]``,
read by the coordinator, which checks every dataset, and by the workers, which train on
it).  A formatter of a deployment is then one more shape: detected like the others when
``dataset_format`` is unset (after the built-ins), or chosen by its name; the file around
it is read by the same readers under the same limits, and what it returns is checked as
the built-ins' is (``records.checked``), so it cannot hand the trainer an empty turn or a
role that does not exist.  Formatters are operator code, never a tenant's: a tenant only
names one that the configuration loaded.

    from cyllm.training.formats import BaseFormatter
    from cyllm.training.records import example, text

    class QA(BaseFormatter):
        name = "qa"                                   # dataset_format: qa
        def matches(self, record):
            return "q" in record and "a" in record
        def convert(self, record, where):
            return example(where, [("user", text(where, record, "q")),
                                   ("assistant", text(where, record, "a"))])
"""

from __future__ import annotations

import functools
import importlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from cyllm.training.records import (
    OPENAI_ROLES,
    DatasetError,
    Judged,
    Record,
    answer,
    checked,
    desirable,
    example,
    preference,
    prompt,
    text,
    turns,
)

NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
# The file around the records: a format name that is one of these says how to read the
# file, and the record shape is detected.
CONTAINERS = ("json", "jsonl", "csv", "parquet", "hf")


class BaseFormatter(ABC):
    """One record shape.  ``matches`` is asked of records whose shape is not known yet
    (the first of a file without ``dataset_format``), and of every later one; ``convert``
    raises ``DatasetError`` naming ``where`` (any other exception is reported as the
    record's fault too)."""

    name: ClassVar[str]

    @abstractmethod
    def matches(self, record: dict[str, Any]) -> bool: ...

    @abstractmethod
    def convert(self, record: dict[str, Any], where: str) -> Record: ...


class OpenAIChat(BaseFormatter):
    name = "openai"

    def matches(self, record: dict[str, Any]) -> bool:
        return "messages" in record

    def convert(self, record: dict[str, Any], where: str) -> Record:
        return example(where, turns(where, record["messages"], "role", "content", OPENAI_ROLES, "messages"))


_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}


class ShareGPT(BaseFormatter):
    name = "sharegpt"

    def matches(self, record: dict[str, Any]) -> bool:
        return "conversations" in record

    def convert(self, record: dict[str, Any], where: str) -> Record:
        found = turns(where, record["conversations"], "from", "value", _SHAREGPT_ROLES, "conversations")
        return example(where, found)


class Alpaca(BaseFormatter):
    name = "alpaca"

    def matches(self, record: dict[str, Any]) -> bool:
        return "instruction" in record and "output" in record

    def convert(self, record: dict[str, Any], where: str) -> Record:
        instruction = text(where, record, "instruction")
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise DatasetError(f"{where}: 'input' must be a string")
        asked = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        system = [("system", text(where, record, "system"))] if record.get("system") else []
        return example(where, [*system, ("user", asked), ("assistant", text(where, record, "output"))])


class Columns(BaseFormatter):
    """A prompt and a response column, by name (the job's prompt_column/response_column),
    or by the names of a known layout."""

    name = "columns"

    def __init__(self, prompt_key: str, response_keys: Sequence[str]) -> None:
        self.prompt_key, self.response_keys = prompt_key, tuple(response_keys)

    def matches(self, record: dict[str, Any]) -> bool:
        return self.prompt_key in record and any(k in record for k in self.response_keys)

    def convert(self, record: dict[str, Any], where: str) -> Record:
        key = next(k for k in self.response_keys if k in record)
        return example(
            where, [("user", text(where, record, self.prompt_key)), ("assistant", text(where, record, key))]
        )


class PromptCompletion(Columns):
    """OpenAI's legacy fine-tune records (``prompt``, ``completion`` or ``response``)."""

    name = "prompt_completion"

    def __init__(self) -> None:
        super().__init__("prompt", ("completion", "response"))


class TextLabel(Columns):
    name = "text_label"

    def __init__(self) -> None:
        super().__init__("text", ("label",))


class OpenAIDPO(BaseFormatter):
    """OpenAI's DPO file: ``input.messages``, ``preferred_output``, ``non_preferred_output``."""

    name = "openai_dpo"

    def matches(self, record: dict[str, Any]) -> bool:
        return all(k in record for k in ("input", "preferred_output", "non_preferred_output"))

    def convert(self, record: dict[str, Any], where: str) -> Record:
        given = record["input"]
        if not isinstance(given, dict):
            raise DatasetError(f"{where}: 'input' must be an object with 'messages'")
        if given.get("tools"):
            raise DatasetError(f"{where}: 'input.tools': preference training on tool calls is not offered")
        return preference(
            where,
            prompt(where, given.get("messages"), "input.messages"),
            answer(where, record["preferred_output"], "preferred_output"),
            answer(where, record["non_preferred_output"], "non_preferred_output"),
        )


def _asked(record: dict[str, Any], where: str) -> tuple[tuple[str, str], ...]:
    """A ``prompt``: a string, or (TRL's conversational form) a list of messages."""
    raw = record["prompt"]
    if isinstance(raw, list):
        return prompt(where, raw, "prompt")
    return (("user", text(where, record, "prompt")),)


class Pairs(BaseFormatter):
    name = "pairs"

    def matches(self, record: dict[str, Any]) -> bool:
        return all(k in record for k in ("prompt", "chosen", "rejected"))

    def convert(self, record: dict[str, Any], where: str) -> Record:
        return preference(
            where,
            _asked(record, where),
            answer(where, record["chosen"], "chosen"),
            answer(where, record["rejected"], "rejected"),
        )


class JudgedAnswer(BaseFormatter):
    """KTO's unpaired data; a label that is not true/false-like leaves the record to
    the prompt/completion shape (supervised)."""

    name = "judged"

    def matches(self, record: dict[str, Any]) -> bool:
        return "prompt" in record and "completion" in record and desirable(record.get("label")) is not None

    def convert(self, record: dict[str, Any], where: str) -> Record:
        label = desirable(record["label"])
        assert label is not None  # matches() read it as judged
        return Judged(_asked(record, where), answer(where, record["completion"], "completion"), label)


# In the order shapes are detected: preference shapes first (a judged answer has a
# prompt and a completion too).
BUILT_IN: tuple[BaseFormatter, ...] = (
    OpenAIDPO(),
    Pairs(),
    JudgedAnswer(),
    OpenAIChat(),
    ShareGPT(),
    Alpaca(),
    PromptCompletion(),
    TextLabel(),
)
PREFERENCE_SHAPES = ("openai_dpo", "pairs", "judged")


class FormatterFactory:
    """The formatters one process knows: the built-ins, then a deployment's."""

    def __init__(self, formatters: Iterable[BaseFormatter] = BUILT_IN) -> None:
        self._by_name: dict[str, BaseFormatter] = {}
        for formatter in formatters:
            self.register(formatter)

    def register(self, formatter: BaseFormatter) -> None:
        name = getattr(formatter, "name", None)
        if not isinstance(name, str) or not NAME.match(name):
            raise ValueError(f"{type(formatter).__name__}: a formatter's name must match {NAME.pattern}")
        if name in self._by_name or name in CONTAINERS or name == Columns.name:
            raise ValueError(f"formatter name {name!r} is taken")
        self._by_name[name] = formatter

    @classmethod
    def configured(cls, paths: Sequence[str]) -> FormatterFactory:
        """The built-ins and the formatters named ``module:Class`` (a config's
        ``dataset_formatters``); ValueError naming the one that cannot be loaded."""
        factory = cls()
        for path in paths:
            module, _, attr = path.partition(":")
            try:
                found = getattr(importlib.import_module(module), attr) if attr else None
            except (ImportError, AttributeError) as exc:
                raise ValueError(f"dataset formatter {path!r} cannot be loaded: {exc}") from exc
            if not (isinstance(found, type) and issubclass(found, BaseFormatter)):
                raise ValueError(f"dataset formatter {path!r} is not a BaseFormatter class (module:Class)")
            factory.register(found())
        return factory

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def get(self, name: str) -> BaseFormatter:
        try:
            return self._by_name[name]
        except KeyError:
            known = ", ".join([*CONTAINERS, *self._by_name])
            raise DatasetError(f"unknown dataset_format {name!r}; known: {known}") from None

    def detect(self, record: dict[str, Any]) -> BaseFormatter | None:
        return next((f for f in self._by_name.values() if f.matches(record)), None)

    def convert(self, formatter: BaseFormatter, record: dict[str, Any], where: str) -> Record:
        if formatter in BUILT_IN or isinstance(formatter, Columns):
            return formatter.convert(record, where)
        try:
            made = formatter.convert(record, where)
        except DatasetError:
            raise
        except Exception as exc:  # a deployment's code failing on a user's record
            raise DatasetError(
                f"{where}: formatter {formatter.name!r}: {type(exc).__name__}: {str(exc)[:200]}"
            ) from None
        return checked(where, made)


def loadable(paths: list[str]) -> list[str]:
    """A settings validator: the formatters a config names load, or ValueError naming
    the one that does not (at start-up, not at the first job)."""
    configured(tuple(paths))
    return paths


@functools.cache
def configured(paths: tuple[str, ...] = ()) -> FormatterFactory:
    """One process's factory for a configuration's formatters (loaded once)."""
    return FormatterFactory.configured(paths)
