"""Datasets: eight formats read into one shape — conversations — and
tokenised for training with the loss on the responses only.

Formats (``dataset_format``, detected when unset):

==========  =====================================================================
``json``      a JSON array of records, each in one of the record shapes below
``jsonl``     one record per line, any record shape
``openai``    records ``{"messages": [{"role", "content"}, ...]}`` (JSON or JSONL)
``sharegpt``  records ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}]}``
``alpaca``    records ``{"instruction", "input"?, "output", "system"?}``
``csv``       a header row; ``prompt``/``response`` columns (or ``text``/``label``, or
              the columns named by ``prompt_column``/``response_column``)
``parquet``   the same columns as CSV, in a Parquet file
``hf``        a Hugging Face dataset: a folder written by ``save_to_disk``, or a folder
              of data files ``datasets`` reads; rows in any record shape or with columns
==========  =====================================================================

Records may also be ``{"prompt", "completion"}`` (OpenAI's legacy fine-tune format).

Preference training (``objective`` dpo, orpo, kto) reads pairs in any of these formats:

=================  ================================================================
OpenAI's DPO       ``{"input": {"messages": [...]}, "preferred_output": [assistant
                   message], "non_preferred_output": [assistant message]}``
pairs              ``{"prompt", "chosen", "rejected"}``: each a string, or (TRL's
                   conversational form) a list of messages
judged (KTO only)  ``{"prompt", "completion", "label"}``: one answer and whether it is
                   desirable (true/false)
=================  ================================================================

Every record of one file has the same shape.  A file that cannot be used is refused
before training with ``DatasetError`` naming the file, the line (text files) or record
(0-based rows of tabular files, 1-based lines otherwise) and what is wrong.

Every file is read within ``Limits`` (bytes on disk, bytes once decompressed, line
length, rows, nesting depth), checked while reading: a dataset is user data, and a
small file can expand into gigabytes.  Only regular files (and, for ``hf``, folders of
them) are read.  The coordinator also reads uploads in a child process under a memory
limit (``check.py``), where anything the caps miss still cannot hurt the service.
"""

from __future__ import annotations

import csv
import json
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cyllm import errors

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
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
_TABULAR = ("csv", "parquet", "hf")


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 512 << 20  # on disk, and once decompressed (Parquet)
    max_rows: int = 1_000_000
    max_line_bytes: int = 4 << 20  # one JSONL line or CSV field
    max_depth: int = 32  # JSON nesting


DEFAULT_LIMITS = Limits()


class DatasetError(errors.InvalidRequest):
    """A dataset that cannot be trained on; the message says where and why."""

    def __init__(self, message: str) -> None:
        super().__init__(message, param="dataset")


Turns = tuple[tuple[str, str], ...]  # (role, content)


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
# What each training objective reads; which records it takes.
OBJECTIVE_RECORDS: dict[str, tuple[type, ...]] = {
    "sft": (Example,),
    "dpo": (Preference,),
    "orpo": (Preference,),
    "kto": (Preference, Judged),
}
_KIND = {Example: "a conversation", Preference: "a preference pair", Judged: "a judged answer"}
_TAKES = {
    "sft": "conversations (supervised training)",
    "dpo": "preference pairs (prompt, chosen, rejected)",
    "orpo": "preference pairs (prompt, chosen, rejected)",
    "kto": "preference pairs or judged answers (prompt, completion, label)",
}


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        with path.open("rb") as f:
            head = f.read(4096).lstrip()
        return "json" if head.startswith(b"[") else "jsonl"
    raise DatasetError(
        f"{path.name}: cannot tell the format from the name; give "
        "dataset_format (json, jsonl, alpaca, sharegpt, openai, hf, csv, parquet)"
    )


def load_examples(
    path: str | Path,
    fmt: str | None = None,
    *,
    prompt_column: str | None = None,
    response_column: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> list[Example]:
    """Every conversation of the dataset at ``path``, or DatasetError."""
    records = load_records(
        path, fmt, "sft", prompt_column=prompt_column, response_column=response_column, limits=limits
    )
    return [r for r in records if isinstance(r, Example)]


def load_preferences(
    path: str | Path, fmt: str | None, objective: str, *, limits: Limits = DEFAULT_LIMITS
) -> list[Preference | Judged]:
    """Every preference record of the dataset at ``path`` that ``objective`` takes."""
    records = load_records(path, fmt, objective, limits=limits)
    return [r for r in records if isinstance(r, (Preference, Judged))]


def load_records(
    path: str | Path,
    fmt: str | None = None,
    objective: str | None = None,
    *,
    prompt_column: str | None = None,
    response_column: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> list[Record]:
    """Every record of the dataset at ``path``, or DatasetError.  ``objective`` (sft, dpo,
    orpo, kto): the records must be of a kind it trains on; None: any one kind (an upload,
    before a job names its objective)."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset {path} does not exist on this worker")
    _check_size(path, limits)
    fmt = fmt or detect_format(path)
    name = path.name
    if fmt in _TABULAR:
        rows = {"csv": _csv_rows, "parquet": _parquet_rows, "hf": _hf_rows}[fmt](path, limits)
        located: Iterator[tuple[str, Any]] = ((f"{name} record {i}", row) for i, row in enumerate(rows))
        return _collect(located, name, None, prompt_column, response_column, limits, objective)
    shape = {"alpaca": "alpaca", "sharegpt": "sharegpt", "openai": "openai"}.get(fmt)
    if fmt == "json" or (shape and detect_format(path) == "json"):
        located = _json_array(path, limits)
    else:
        located = _jsonl(path, limits)
    return _collect(located, name, shape, prompt_column, response_column, limits, objective)


def _check_size(path: Path, limits: Limits) -> None:
    """Regular files only (a device or a FIFO never ends), within ``max_bytes`` in all."""
    files = [p for p in path.rglob("*") if not p.is_dir()] if path.is_dir() else [path]
    total = 0
    for f in files:
        st = f.stat()
        if not stat.S_ISREG(st.st_mode):
            raise DatasetError(f"{f.name}: not a regular file")
        total += st.st_size
    if total > limits.max_bytes:
        raise DatasetError(f"{path.name}: {total} bytes, over the {limits.max_bytes} byte limit")


def _depth(value: Any, limit: int) -> bool:
    """Whether ``value`` nests deeper than ``limit`` (iteratively: no recursion to blow)."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d > limit:
                return True
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return False


def _collect(
    located: Iterable[tuple[str, Any]],
    name: str,
    shape: str | None,
    prompt_column: str | None,
    response_column: str | None,
    limits: Limits = DEFAULT_LIMITS,
    objective: str | None = None,
) -> list[Record]:
    out: list[Record] = []
    for where, record in located:
        if len(out) >= limits.max_rows:
            raise DatasetError(f"{name}: more than {limits.max_rows} records")
        if _depth(record, limits.max_depth):
            raise DatasetError(f"{where}: nested deeper than {limits.max_depth} levels")
        if not isinstance(record, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
        found = record_shape(record, prompt_column, response_column)
        if found is None:
            raise DatasetError(
                f"{where}: not a training record; expected 'messages' (OpenAI), "
                "'conversations' (ShareGPT), 'instruction'+'output' (Alpaca), "
                "'prompt'+'completion', prompt/response columns, or for preference training "
                "'input'+'preferred_output'+'non_preferred_output' (OpenAI DPO), "
                "'prompt'+'chosen'+'rejected', 'prompt'+'completion'+'label'; "
                f"found keys {sorted(record)[:8]}"
            )
        shape = shape or found
        if found != shape:
            raise DatasetError(f"{where}: a {found} record in a dataset of {shape} records")
        item = (
            _to_preference(where, shape, record)
            if shape in PREFERENCE_SHAPES
            else _to_example(where, shape, record, prompt_column, response_column)
        )
        if objective is not None and not isinstance(item, OBJECTIVE_RECORDS[objective]):
            hint = " ('label' must be true or false for a judged answer)" if "label" in record else ""
            raise DatasetError(
                f"{where}: {_KIND[type(item)]}, but objective {objective!r} trains on {_TAKES[objective]}"
                + hint
            )
        out.append(item)
    if not out:
        raise DatasetError(f"{name}: the dataset has no records")
    return out


def record_shape(
    record: dict[str, Any], prompt_column: str | None = None, response_column: str | None = None
) -> str | None:
    if prompt_column and response_column and prompt_column in record:
        return "columns"
    # preference shapes first: a judged answer has a prompt and a completion too
    if "input" in record and "preferred_output" in record and "non_preferred_output" in record:
        return "openai_dpo"
    if "prompt" in record and "chosen" in record and "rejected" in record:
        return "pairs"
    if "prompt" in record and "completion" in record and _desirable(record.get("label")) is not None:
        return "judged"  # (a label that is not true/false leaves a prompt/completion record)
    if "messages" in record:
        return "openai"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and ("completion" in record or "response" in record):
        return "prompt_completion"
    if "text" in record and "label" in record:
        return "text_label"
    return None


def _to_example(
    where: str, shape: str, r: dict[str, Any], prompt_column: str | None, response_column: str | None
) -> Example:
    if shape == "openai":
        turns = _turns(where, r["messages"], "role", "content", {x: x for x in ROLES}, "messages")
    elif shape == "sharegpt":
        turns = _turns(where, r["conversations"], "from", "value", _SHAREGPT_ROLES, "conversations")
    elif shape == "alpaca":
        instruction = _text(where, r, "instruction")
        extra = r.get("input") or ""
        if not isinstance(extra, str):
            raise DatasetError(f"{where}: 'input' must be a string")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        turns = ([("system", _text(where, r, "system"))] if r.get("system") else []) + [
            ("user", prompt),
            ("assistant", _text(where, r, "output")),
        ]
    else:
        p, a = {
            "columns": (prompt_column, response_column),
            "prompt_completion": ("prompt", "completion" if "completion" in r else "response"),
            "text_label": ("text", "label"),
        }[shape]
        assert p is not None and a is not None  # "columns" only when both columns are named
        turns = [("user", _text(where, r, p)), ("assistant", _text(where, r, a))]
    if not any(role == "assistant" for role, _ in turns):
        raise DatasetError(f"{where}: no assistant message to learn from")
    while turns[-1][0] != "assistant":  # trailing user turns teach nothing
        turns.pop()
    return Example(tuple(turns))


PREFERENCE_SHAPES = ("openai_dpo", "pairs", "judged")
# true/false, 1/0 (True and 1 are one key), or their text (CSV)
_LABELS = {True: True, False: False, "true": True, "false": False, "1": True, "0": False}


def _to_preference(where: str, shape: str, r: dict[str, Any]) -> Preference | Judged:
    if shape == "openai_dpo":
        given = r["input"]
        if not isinstance(given, dict):
            raise DatasetError(f"{where}: 'input' must be an object with 'messages'")
        if given.get("tools"):
            raise DatasetError(f"{where}: 'input.tools': preference training on tool calls is not offered")
        prompt = _prompt(where, given.get("messages"), "input.messages")
        chosen = _answer(where, r["preferred_output"], "preferred_output")
        rejected = _answer(where, r["non_preferred_output"], "non_preferred_output")
    else:
        raw = r["prompt"]
        prompt = (
            (("user", _text(where, r, "prompt")),)
            if not isinstance(raw, list)
            else _prompt(where, raw, "prompt")
        )
        if shape == "judged":
            desirable = _desirable(r["label"])
            assert desirable is not None  # record_shape reads it as judged only then
            return Judged(prompt, _answer(where, r["completion"], "completion"), desirable)
        chosen = _answer(where, r["chosen"], "chosen")
        rejected = _answer(where, r["rejected"], "rejected")
    if chosen == rejected:
        raise DatasetError(f"{where}: the chosen and rejected answers are the same")
    return Preference(prompt, chosen, rejected)


def _desirable(label: Any) -> bool | None:
    key = label.strip().lower() if isinstance(label, str) else label
    return _LABELS.get(key) if isinstance(key, (bool, int, str)) else None


def _prompt(where: str, items: Any, field: str) -> Turns:
    """A prompt's messages, ending with the user's."""
    turns = _turns(where, items, "role", "content", {x: x for x in ROLES}, field)
    if turns[-1][0] != "user":
        raise DatasetError(f"{where}: '{field}' must end with a user message")
    return tuple(turns)


def _answer(where: str, value: Any, field: str) -> str:
    """An answer: a string, or a list of one assistant message (OpenAI's and TRL's form)."""
    if not isinstance(value, list):
        if isinstance(value, dict):
            raise DatasetError(f"{where}: '{field}' must be a string or a list of one assistant message")
        return _text(where, {field: value}, field)
    turns = _turns(where, value, "role", "content", {x: x for x in ROLES}, field)
    if len(turns) != 1 or turns[0][0] != "assistant":
        raise DatasetError(f"{where}: '{field}' must be one assistant message")
    return turns[0][1]


def _turns(
    where: str, items: Any, role_key: str, text_key: str, roles: dict[str, str], field: str
) -> list[tuple[str, str]]:
    if not isinstance(items, list) or not items:
        raise DatasetError(f"{where}: '{field}' must be a non-empty list")
    turns = []
    for i, m in enumerate(items):
        if not isinstance(m, dict):
            raise DatasetError(f"{where}: {field}[{i}] must be an object")
        role = m.get(role_key)
        if not isinstance(role, str) or role not in roles:
            raise DatasetError(
                f"{where}: {field}[{i}] has {role_key} {role!r}; expected one of {', '.join(sorted(roles))}"
            )
        turns.append((roles[role], _text(where, m, text_key, f"{field}[{i}].")))
    return turns


def _text(where: str, record: dict[str, Any], key: str, prefix: str = "") -> str:
    value = record.get(key)
    if value is None or (isinstance(value, float) and value != value):  # NaN from pandas
        raise DatasetError(f"{where}: '{prefix}{key}' is missing")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # a numeric label
    if not isinstance(value, str):
        raise DatasetError(f"{where}: '{prefix}{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DatasetError(f"{where}: '{prefix}{key}' is empty")
    return value


# -- readers: (where, record) pairs ------------------------------------------------------


def _jsonl(path: Path, limits: Limits) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for n, raw in enumerate(iter(lambda: f.readline(limits.max_line_bytes + 1), b""), 1):
            if len(raw) > limits.max_line_bytes:
                raise DatasetError(f"{path.name} line {n}: longer than {limits.max_line_bytes} bytes")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(
                    f"{path.name} line {n}: not UTF-8 text ({exc.reason} at byte {exc.start})"
                ) from None
            if not line.strip():
                continue
            yield f"{path.name} line {n}", _loads(line, f"{path.name} line {n}", limits)


def _loads(text: str, where: str, limits: Limits) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except ValueError as exc:  # an integer of thousands of digits
        raise DatasetError(f"{where}: not usable JSON ({str(exc)[:80]})") from None
    except RecursionError:
        raise DatasetError(f"{where}: nested deeper than {limits.max_depth} levels") from None


def _json_array(path: Path, limits: Limits) -> Iterator[tuple[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path.name}: not UTF-8 text ({exc.reason})") from None
    except RecursionError:
        raise DatasetError(f"{path.name}: nested deeper than {limits.max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{path.name} line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DatasetError(f"{path.name}: expected a JSON array of records, got {type(data).__name__}")
    for i, record in enumerate(data):
        yield f"{path.name} record {i}", record


def _csv_rows(path: Path, limits: Limits) -> Iterator[dict[str, Any]]:
    csv.field_size_limit(limits.max_line_bytes)
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, dialect="excel-tab" if path.suffix == ".tsv" else "excel")
            if not reader.fieldnames:
                raise DatasetError(f"{path.name}: no header row")
            for row in reader:
                if None in row:
                    raise DatasetError(
                        f"{path.name} line {reader.line_num}: more fields than "
                        f"the header's {len(reader.fieldnames)}"
                    )
                yield row
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path.name}: not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise DatasetError(f"{path.name}: not valid CSV ({exc})") from None


def _parquet_rows(path: Path, limits: Limits) -> Iterator[dict[str, Any]]:
    """Row group by row group, after the footer's sizes are checked: a small file of
    repeated values can decompress to hundreds of megabytes."""
    import pyarrow.parquet as pq  # installed with datasets

    try:
        file = pq.ParquetFile(path)
        meta = file.metadata
    except Exception as exc:
        raise DatasetError(f"{path.name}: not a readable Parquet file ({exc})") from None
    if meta.num_rows > limits.max_rows:
        raise DatasetError(f"{path.name}: more than {limits.max_rows} records")
    expanded = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if expanded > limits.max_bytes:
        raise DatasetError(
            f"{path.name}: {expanded} bytes once decompressed, over the {limits.max_bytes} byte limit"
        )
    # The footer's sizes are of encoded pages, and dictionary pages expand further: the
    # decoded row groups are counted too (one group at a time, under the reader's
    # memory limit, see check.py).
    read = 0
    try:
        for i in range(meta.num_row_groups):
            group = file.read_row_group(i)
            read += group.nbytes
            if read > limits.max_bytes:
                raise DatasetError(
                    f"{path.name}: more than {limits.max_bytes} bytes once decompressed, over the limit"
                )
            yield from group.to_pylist()
    except (DatasetError, MemoryError):
        raise
    except Exception as exc:
        raise DatasetError(f"{path.name}: not a readable Parquet file ({exc})") from None


def _hf_rows(path: Path, limits: Limits) -> Iterator[dict[str, Any]]:
    import datasets

    try:
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(str(path))
    except Exception as exc:
        raise DatasetError(f"{path.name}: not a Hugging Face dataset ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DatasetError(
                f"{path.name}: a dataset dict without a 'train' split (splits: {', '.join(ds)})"
            )
        ds = ds["train"]
    yield from ds


# -- tokenising ----------------------------------------------------------------------------


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss is taken (prompt, template, padding)


def tokenize(example: Example, tokenizer: Any, max_length: int) -> Tokenized | None:
    """The conversation through the model's chat template; labels only on the assistant
    turns' tokens (and their end-of-turn); cut at ``max_length``.  None when nothing of a
    response is left after the cut."""
    messages = example.as_messages()
    ids = _template(tokenizer, messages, generation_prompt=False)
    labels = [-100] * len(ids)
    for i, (role, _) in enumerate(example.messages):
        if role != "assistant":
            continue
        start = len(_template(tokenizer, messages[:i], generation_prompt=True))
        end = len(_template(tokenizer, messages[: i + 1], generation_prompt=False))
        labels[start:end] = ids[start:end]
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == -100 for label in labels):
        return None
    return Tokenized(ids, labels)


def _template(tokenizer: Any, messages: list[Message], generation_prompt: bool) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True
        )
        return list(out["input_ids"])
    # A model without a chat template: plain "role: content" lines.
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    if generation_prompt:
        text += "assistant: "
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if not generation_prompt and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(ids)
