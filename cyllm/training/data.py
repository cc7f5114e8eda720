"""Datasets: files read record by record, each record through a formatter
(``formats.py``) into a conversation, a preference pair or a judged answer; and
conversations tokenised for training with the loss on the responses only.

``dataset_format`` (detected when unset) names either the file's container (json,
jsonl, csv, parquet, hf) or a record shape (a registered formatter's name: openai,
sharegpt, alpaca, ... or a deployment's own), the container then told by the name:

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

Records may also be ``{"prompt", "completion"}`` (OpenAI's legacy fine-tune format,
``prompt_completion``) or ``{"text", "label"}`` (``text_label``).

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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cyllm.training.formats import BUILT_IN, CONTAINERS, BaseFormatter, Columns, FormatterFactory, configured
from cyllm.training.records import DatasetError, Example, Judged, Message, Preference, Record

if TYPE_CHECKING:
    from cyllm.training.spec import TrainingSpec

# What each training objective reads; which records it takes.
OBJECTIVE_RECORDS: dict[str, tuple[type, ...]] = {
    "sft": (Example,),
    "dpo": (Preference,),
    "orpo": (Preference,),
    "kto": (Preference, Judged),
}
_BUILT_IN_NAMES = {f.name for f in BUILT_IN}
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
        f"dataset_format ({', '.join(CONTAINERS)}, or a record shape such as openai)"
    )


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 512 << 20  # on disk, and once decompressed (Parquet)
    max_rows: int = 1_000_000
    max_line_bytes: int = 4 << 20  # one JSONL line or CSV field
    max_depth: int = 32  # JSON nesting


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Reading:
    """How to read a dataset beyond its path: the format (a container or a formatter's
    name; None: detected), named columns, and for a Hugging Face dataset folder (a Hub
    dataset once fetched) its config and split."""

    fmt: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    config: str | None = None
    split: str = "train"
    formatters: tuple[str, ...] = ()  # a deployment's, as module:Class (formats.configured)

    @classmethod
    def of(cls, spec: TrainingSpec, field: str, formatters: Sequence[str] = ()) -> Reading:
        """How ``spec`` reads its ``dataset`` or ``validation_dataset``."""
        return cls(
            spec.dataset_format,
            spec.prompt_column,
            spec.response_column,
            spec.dataset_config,
            spec.split_of(field),
            tuple(formatters),
        )


def load_examples(
    path: str | Path, reading: Reading = Reading(), *, limits: Limits = DEFAULT_LIMITS
) -> list[Example]:
    """Every conversation of the dataset at ``path``, or DatasetError."""
    return [r for r in load_records(path, reading, "sft", limits=limits) if isinstance(r, Example)]


def load_preferences(
    path: str | Path, reading: Reading, objective: str, *, limits: Limits = DEFAULT_LIMITS
) -> list[Preference | Judged]:
    """Every preference record of the dataset at ``path`` that ``objective`` takes."""
    records = load_records(path, reading, objective, limits=limits)
    return [r for r in records if isinstance(r, (Preference, Judged))]


def load_records(
    path: str | Path,
    reading: Reading = Reading(),
    objective: str | None = None,
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> list[Record]:
    """Every record of the dataset at ``path``, or DatasetError.  ``objective`` (sft, dpo,
    orpo, kto): the records must be of a kind it trains on; None: any one kind (an upload,
    before a job names its objective)."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset {path} does not exist on this worker")
    _check_size(path, limits)
    fmt = reading.fmt or detect_format(path)
    factory = configured(reading.formatters)
    shape = None if fmt in CONTAINERS else factory.get(fmt)
    container = fmt if shape is None else detect_format(path)
    name = path.name
    located: Iterator[tuple[str, Any]]
    if container == "hf":
        located = _folder_records(path, limits, reading.config, reading.split)
    elif container in ("csv", "parquet"):
        rows = {"csv": _csv_rows, "parquet": _parquet_rows}[container](path, limits)
        located = ((f"{name} record {i}", row) for i, row in enumerate(rows))
    elif container == "json":
        located = _json_array(path, limits)
    else:
        located = _jsonl(path, limits)
    return _collect(located, name, shape, factory, reading, limits, objective)


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


_SHAPES_EXPECTED = (
    "expected 'messages' (OpenAI), 'conversations' (ShareGPT), 'instruction'+'output' (Alpaca), "
    "'prompt'+'completion', prompt/response columns, or for preference training "
    "'input'+'preferred_output'+'non_preferred_output' (OpenAI DPO), "
    "'prompt'+'chosen'+'rejected', 'prompt'+'completion'+'label'"
)


def _collect(
    located: Iterable[tuple[str, Any]],
    name: str,
    shape: BaseFormatter | None,
    factory: FormatterFactory,
    reading: Reading,
    limits: Limits,
    objective: str | None,
) -> list[Record]:
    """Each record through its formatter: the one named, or the first record's, which
    every later record must also match."""
    columns = (
        Columns(reading.prompt_column, (reading.response_column,))
        if reading.prompt_column and reading.response_column
        else None
    )
    out: list[Record] = []
    for where, record in located:
        if len(out) >= limits.max_rows:
            raise DatasetError(f"{name}: more than {limits.max_rows} records")
        if _depth(record, limits.max_depth):
            raise DatasetError(f"{where}: nested deeper than {limits.max_depth} levels")
        if not isinstance(record, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if shape is None or not shape.matches(record):
            found = columns if columns and columns.prompt_key in record else factory.detect(record)
            if found is None:
                more = [n for n in factory.names if n not in _BUILT_IN_NAMES]
                also = f" (or this server's {', '.join(more)})" if more else ""
                ours = f" (this dataset's records are {shape.name})" if shape else ""
                raise DatasetError(
                    f"{where}: not a training record{ours}; {_SHAPES_EXPECTED}{also}; "
                    f"found keys {sorted(record)[:8]}"
                )
            if shape is not None:
                raise DatasetError(f"{where}: a {found.name} record in a dataset of {shape.name} records")
            shape = found
        item = factory.convert(shape, record, where)
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


# A folder's data files by suffix: read by this module's own readers, under its limits.
_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".pq")
_SPLIT_WORDS = ("train", "validation", "valid", "dev", "test", "eval")


def _folder_records(path: Path, limits: Limits, config: str | None, split: str) -> Iterator[tuple[str, Any]]:
    """A Hugging Face dataset folder's records: a ``save_to_disk`` folder (an operator's)
    through ``datasets``; a folder of data files — a Hub dataset once fetched — file by
    file through the readers above.  Which files make a config's split is read from the
    dataset card's ``configs`` (as the Hub does), but only as patterns inside the folder:
    a card is the dataset author's, and ``datasets`` would follow an absolute path, a
    ``..`` or a URL in it to any file or address the server can reach."""
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        for i, row in enumerate(_saved_rows(path, split)):
            yield f"{path.name} record {i}", row
        return
    for file in _split_files(path, config, split):
        name = file.relative_to(path).as_posix()
        suffix = file.suffix.lower()
        if suffix in (".csv", ".tsv", ".parquet", ".pq"):
            rows = _csv_rows(file, limits) if suffix in (".csv", ".tsv") else _parquet_rows(file, limits)
            yield from ((f"{name} record {i}", row) for i, row in enumerate(rows))
        elif detect_format(file) == "json":
            yield from _json_array(file, limits)
        else:
            yield from _jsonl(file, limits)


def _saved_rows(path: Path, split: str) -> Iterator[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DatasetError(f"{path.name}: not a Hugging Face dataset ({str(exc)[:300]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DatasetError(f"{path.name}: no split {split!r} (splits: {', '.join(ds)})")
        ds = ds[split]
    yield from ds


def _split_files(root: Path, config: str | None, split: str) -> list[Path]:
    configs = _card_configs(root)
    if configs:
        names = [str(c.get("config_name", "default")) for c in configs]
        if config is not None:
            chosen = next((c for c, n in zip(configs, names) if n == config), None)
            if chosen is None:
                raise DatasetError(f"{root.name}: no config {config!r} (configs: {', '.join(names)})")
        else:
            chosen = next((c for c in configs if c.get("default")), configs[0])
        splits = _card_splits(root, chosen)
        if split not in splits:
            raise DatasetError(f"{root.name}: no split {split!r} (splits: {', '.join(splits) or 'none'})")
        found = [f for pattern in splits[split] for f in _inside(root, pattern)]
    else:
        if config is not None:
            raise DatasetError(f"{root.name}: no config {config!r} (the dataset's card names none)")
        files = [f for f in sorted(root.rglob("*")) if f.suffix.lower() in _DATA_SUFFIXES and f.is_file()]
        named = {w: [f for f in files if _mentions(f.relative_to(root), w)] for w in _SPLIT_WORDS}
        found = named.get(split, [f for f in files if _mentions(f.relative_to(root), split)])
        if not found and split == "train" and not any(named.values()):
            found = files  # files that name no split are the training split
        if not found:
            present = [w for w, fs in named.items() if fs] or (["train"] if files else [])
            raise DatasetError(f"{root.name}: no split {split!r} (splits: {', '.join(present) or 'none'})")
    data = sorted({f for f in found if f.suffix.lower() in _DATA_SUFFIXES})
    if not data:
        raise DatasetError(f"{root.name}: split {split!r} has no JSON, JSONL, CSV or Parquet files")
    return data


def _card_configs(root: Path) -> list[dict[str, Any]]:
    """The ``configs`` of the dataset card's YAML header ([] without one)."""
    import yaml

    card = root / "README.md"
    if not card.is_file():
        return []
    text = card.read_text(encoding="utf-8", errors="replace")[: 1 << 20]
    if not text.startswith("---"):
        return []
    header = text[3:].split("\n---", 1)[0]
    try:
        meta = yaml.safe_load(header)
    except yaml.YAMLError:
        raise DatasetError(f"{root.name}: its README's YAML header cannot be read") from None
    configs = meta.get("configs") if isinstance(meta, dict) else None
    if configs is None:
        return []
    if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
        raise DatasetError(f"{root.name}: its README's 'configs' must be a list of objects")
    return configs


def _card_splits(root: Path, config: dict[str, Any]) -> dict[str, list[str]]:
    """A card config's ``data_files`` as split → patterns (relative to its ``data_dir``)."""
    given = config.get("data_files", "**/*")
    base = config.get("data_dir", "")
    if not isinstance(base, str):
        raise DatasetError(f"{root.name}: a config's data_dir must be a path")
    if isinstance(given, (str, list)) and all(
        isinstance(p, str) for p in ([given] if isinstance(given, str) else given)
    ):
        given = [{"split": "train", "path": given}]
    if not isinstance(given, list):
        raise DatasetError(f"{root.name}: a config's data_files must be a list of splits and paths")
    out: dict[str, list[str]] = {}
    for entry in given:
        if not isinstance(entry, dict) or not isinstance(entry.get("split"), str):
            raise DatasetError(f"{root.name}: a config's data_files entry needs a split and a path")
        paths = entry.get("path")
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise DatasetError(f"{root.name}: split {entry['split']!r}: its path must be text")
        out.setdefault(entry["split"], []).extend(f"{base}/{p}" if base else p for p in paths)
    return out


def _inside(root: Path, pattern: str) -> list[Path]:
    """The files a card's pattern names, only inside ``root``: no absolute path, no
    ``..``, no URL or other protocol."""
    parts = pattern.replace("\\", "/").split("/")
    if pattern.startswith(("/", "~")) or "://" in pattern or ":" in parts[0] or ".." in parts:
        raise DatasetError(f"{root.name}: the card names {pattern[:80]!r}, outside the dataset")
    return [f for f in sorted(root.glob(pattern)) if f.is_file()]


def _mentions(relative: Path, word: str) -> bool:
    """Whether a data file's path names a split as the Hub's conventions do (a folder
    ``train/``, a file ``train.jsonl``, ``train-00000-of-00001.parquet``)."""
    names = [*relative.parts[:-1], relative.name.split(".")[0]]
    return any(n == word or n.startswith((f"{word}-", f"{word}_")) for n in names)


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
