"""What a dataset's records become — a conversation, a preference pair, a judged answer —
and the checks a formatter uses to build them from a record it was given.

A formatter (``formats.py``) turns one record of a user's file into one of these; every
check here names where the record is (``where``: the file and its line or row) and what
is wrong, so that a refused dataset says which line to fix.  The helpers are public for
a deployment's own formatters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cyllm import errors

Message = dict[str, str]
Turns = tuple[tuple[str, str], ...]  # (role, content)
ROLES = ("system", "user", "assistant")
OPENAI_ROLES = {r: r for r in ROLES}


class DatasetError(errors.InvalidRequest):
    """A dataset that cannot be trained on; the message says where and why."""

    def __init__(self, message: str) -> None:
        super().__init__(message, param="dataset")


def _as_messages(turns: Turns) -> list[Message]:
    return [{"role": r, "content": c} for r, c in turns]


@dataclass(frozen=True)
class Example:
    """A conversation to learn from (supervised)."""

    messages: Turns  # ending with an assistant turn

    def as_messages(self) -> list[Message]:
        return _as_messages(self.messages)


@dataclass(frozen=True)
class Preference:
    """Two answers to one prompt, the first preferred (DPO, ORPO, KTO)."""

    prompt: Turns  # ending with a user turn
    chosen: str
    rejected: str

    def as_row(self) -> dict[str, Any]:
        """TRL's conversational preference row."""
        return {
            "prompt": _as_messages(self.prompt),
            "chosen": [{"role": "assistant", "content": self.chosen}],
            "rejected": [{"role": "assistant", "content": self.rejected}],
        }


@dataclass(frozen=True)
class Judged:
    """One answer to a prompt and whether it is desirable (KTO's unpaired data)."""

    prompt: Turns
    completion: str
    desirable: bool

    def as_row(self) -> dict[str, Any]:
        """TRL's conversational unpaired row."""
        return {
            "prompt": _as_messages(self.prompt),
            "completion": [{"role": "assistant", "content": self.completion}],
            "label": self.desirable,
        }


Record = Example | Preference | Judged


def example(where: str, turns: list[tuple[str, str]]) -> Example:
    """A conversation that teaches something: it has an assistant turn, and trailing
    user turns (which teach nothing) are dropped."""
    if not any(role == "assistant" for role, _ in turns):
        raise DatasetError(f"{where}: no assistant message to learn from")
    turns = list(turns)
    while turns[-1][0] != "assistant":
        turns.pop()
    return Example(tuple(turns))


def preference(where: str, prompt_turns: Turns, chosen: str, rejected: str) -> Preference:
    if chosen == rejected:
        raise DatasetError(f"{where}: the chosen and rejected answers are the same")
    return Preference(prompt_turns, chosen, rejected)


def checked(where: str, record: Any) -> Record:
    """A formatter's output, checked as the built-in ones build theirs: a deployment's
    formatter is code, but what it returns comes from a user's file."""
    if isinstance(record, Example):
        turns = _checked_turns(where, record.messages, "messages")
        return example(where, turns)
    if isinstance(record, (Preference, Judged)):
        asked = _checked_turns(where, record.prompt, "prompt")
        if asked[-1][0] != "user":
            raise DatasetError(f"{where}: 'prompt' must end with a user message")
        if isinstance(record, Judged):
            if not isinstance(record.desirable, bool):
                raise DatasetError(f"{where}: 'label' must be true or false")
            return Judged(
                tuple(asked), text(where, {"completion": record.completion}, "completion"), record.desirable
            )
        chosen = text(where, {"chosen": record.chosen}, "chosen")
        return preference(where, tuple(asked), chosen, text(where, {"rejected": record.rejected}, "rejected"))
    raise DatasetError(f"{where}: the formatter gave {type(record).__name__}, not a record")


def _checked_turns(where: str, turns: Any, field: str) -> list[tuple[str, str]]:
    if not isinstance(turns, (tuple, list)) or not turns:
        raise DatasetError(f"{where}: '{field}' must be a non-empty list")
    out = []
    for i, turn in enumerate(turns):
        if not (isinstance(turn, (tuple, list)) and len(turn) == 2 and turn[0] in ROLES):
            raise DatasetError(
                f"{where}: {field}[{i}] must be (role, content), role one of {', '.join(ROLES)}"
            )
        out.append((turn[0], text(where, {"content": turn[1]}, "content", f"{field}[{i}].")))
    return out


# true/false, 1/0 (True and 1 are one key), or their text (CSV)
_LABELS = {True: True, False: False, "true": True, "false": False, "1": True, "0": False}


def desirable(label: Any) -> bool | None:
    """A judged answer's label as a bool; None when it is not true/false-like."""
    key = label.strip().lower() if isinstance(label, str) else label
    return _LABELS.get(key) if isinstance(key, (bool, int, str)) else None


def prompt(where: str, items: Any, field: str) -> Turns:
    """A prompt's messages, ending with the user's."""
    found = turns(where, items, "role", "content", OPENAI_ROLES, field)
    if found[-1][0] != "user":
        raise DatasetError(f"{where}: '{field}' must end with a user message")
    return tuple(found)


def answer(where: str, value: Any, field: str) -> str:
    """An answer: a string, or a list of one assistant message (OpenAI's and TRL's form)."""
    if not isinstance(value, list):
        if isinstance(value, dict):
            raise DatasetError(f"{where}: '{field}' must be a string or a list of one assistant message")
        return text(where, {field: value}, field)
    found = turns(where, value, "role", "content", OPENAI_ROLES, field)
    if len(found) != 1 or found[0][0] != "assistant":
        raise DatasetError(f"{where}: '{field}' must be one assistant message")
    return found[0][1]


def turns(
    where: str, items: Any, role_key: str, text_key: str, roles: dict[str, str], field: str
) -> list[tuple[str, str]]:
    """A list of messages: ``roles`` maps the file's role names to system/user/assistant."""
    if not isinstance(items, list) or not items:
        raise DatasetError(f"{where}: '{field}' must be a non-empty list")
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, dict):
            raise DatasetError(f"{where}: {field}[{i}] must be an object")
        role = m.get(role_key)
        if not isinstance(role, str) or role not in roles:
            raise DatasetError(
                f"{where}: {field}[{i}] has {role_key} {role!r}; expected one of {', '.join(sorted(roles))}"
            )
        out.append((roles[role], text(where, m, text_key, f"{field}[{i}].")))
    return out


def text(where: str, record: dict[str, Any], key: str, prefix: str = "") -> str:
    """A non-empty string (a number, as in a CSV's label column, is taken as its text)."""
    value = record.get(key)
    if value is None or (isinstance(value, float) and value != value):  # NaN from pandas
        raise DatasetError(f"{where}: '{prefix}{key}' is missing")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DatasetError(f"{where}: '{prefix}{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DatasetError(f"{where}: '{prefix}{key}' is empty")
    return value
