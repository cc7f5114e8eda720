"""The eight dataset formats read into the same examples; malformed files refused with
the file, the line or record, and what is wrong; response-only loss masking."""

from __future__ import annotations

import csv
import json

import pytest

from cyllm import errors
from cyllm.training.data import DatasetError, Example, Reading, detect_format, load_examples, tokenize
from cyllm.training.spec import TrainingSpec

PAIRS = [
    ("What is the capital of Zorblax?", "Quendari."),
    ("Who invented the flumph engine?", "Dr. Mirela Vantosk."),
    ('Say, with a comma, "hi"', "hi, there"),
]
EXPECTED = [Example((("user", q), ("assistant", a))) for q, a in PAIRS]


def _openai(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def _sharegpt(q, a):
    return {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}


def _alpaca(q, a):
    return {"instruction": q, "input": "", "output": a}


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _write_csv(path, header, rows):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _make(fmt, tmp_path):
    if fmt == "json":
        p = tmp_path / "data.json"
        p.write_text(json.dumps([_openai(q, a) for q, a in PAIRS], indent=2))
        return p
    if fmt == "jsonl":
        return _write_jsonl(tmp_path / "data.jsonl", [{"prompt": q, "completion": a} for q, a in PAIRS])
    if fmt == "openai":
        return _write_jsonl(tmp_path / "chat.jsonl", [_openai(q, a) for q, a in PAIRS])
    if fmt == "sharegpt":
        p = tmp_path / "sharegpt.json"
        p.write_text(json.dumps([_sharegpt(q, a) for q, a in PAIRS]))
        return p
    if fmt == "alpaca":
        return _write_jsonl(tmp_path / "alpaca.jsonl", [_alpaca(q, a) for q, a in PAIRS])
    if fmt == "csv":
        return _write_csv(tmp_path / "data.csv", ["text", "label"], PAIRS)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = tmp_path / "data.parquet"
        pq.write_table(pa.table({"prompt": [q for q, _ in PAIRS], "response": [a for _, a in PAIRS]}), p)
        return p
    if fmt == "hf":
        import datasets

        p = tmp_path / "hf"
        datasets.Dataset.from_list([_sharegpt(q, a) for q, a in PAIRS]).save_to_disk(str(p))
        return p
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["json", "jsonl", "alpaca", "sharegpt", "openai", "hf", "csv", "parquet"])
@pytest.mark.parametrize("named", [False, True], ids=["detected", "named"])
def test_each_format_gives_the_same_examples(fmt, named, tmp_path):
    path = _make(fmt, tmp_path)
    assert load_examples(path, Reading(fmt if named else None)) == EXPECTED


def test_hf_folder_of_data_files_and_named_columns(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    _write_csv(folder / "train.csv", ["question", "answer"], PAIRS)
    got = load_examples(folder, Reading("hf", prompt_column="question", response_column="answer"))
    assert got == EXPECTED


def test_alpaca_input_and_system_and_multi_turn_openai(tmp_path):
    p = _write_jsonl(
        tmp_path / "a.jsonl",
        [{"instruction": "Translate", "input": "chat", "output": "cat", "system": "Be brief."}],
    )
    assert load_examples(p) == [
        Example((("system", "Be brief."), ("user", "Translate\n\nchat"), ("assistant", "cat")))
    ]
    turns = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "dangling"},
    ]
    p = _write_jsonl(tmp_path / "m.jsonl", [{"messages": turns}])
    assert [r for r, _ in load_examples(p)[0].messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]


MALFORMED = [
    (
        "bad.jsonl",
        '{"messages": []}\n{"messages": [',
        "bad.jsonl line 1: 'messages' must be a non-empty list",
    ),
    ("bad.jsonl", json.dumps(_openai("q", "a")) + "\n{not json}\n", "bad.jsonl line 2: not valid JSON"),
    (
        "bad.jsonl",
        json.dumps(_openai("q", "a")) + "\n\n" + json.dumps({"foo": 1}) + "\n",
        "bad.jsonl line 3: not a training record",
    ),
    (
        "bad.jsonl",
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
        "bad.jsonl line 1: messages[0] has role 'robot'",
    ),
    (
        "bad.jsonl",
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        "bad.jsonl line 1: no assistant message",
    ),
    (
        "bad.jsonl",
        json.dumps(_openai("q", "a")) + "\n" + json.dumps(_alpaca("q", "a")),
        "bad.jsonl line 2: a alpaca record in a dataset of openai records",
    ),
    (
        "bad.jsonl",
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}),
        "bad.jsonl line 1: 'messages[1].content' is empty",
    ),
    (
        "bad.jsonl",
        json.dumps({"instruction": "q", "output": 7.5, "input": ["x"]}),
        "bad.jsonl line 1: 'input' must be a string",
    ),
    (
        "bad.json",
        '[{"prompt": "a", "completion": "b"},\n {"prompt": "c", "completion": null}]',
        "bad.json record 1: 'completion' is missing",
    ),
    ("bad.json", '[{"prompt": "a",\n "completion": "b"},,]', "bad.json line 2: not valid JSON"),
    ("bad.json", "[1, 2]", "bad.json record 0: expected a JSON object"),
    ("bad.csv", "text,label\nq,a\nq2,a2,extra\n", "bad.csv line 3: more fields than the header"),
    ("bad.csv", "text,label\nq,a\nq2,\n", "bad.csv record 1: 'label' is empty"),
    ("bad.csv", "question,answer\nq,a\n", "bad.csv record 0: not a training record"),
    ("empty.jsonl", "\n\n", "empty.jsonl: the dataset has no records"),
    ("latin1.jsonl", b'{"prompt": "caf\xe9"}', "latin1.jsonl line 1: not UTF-8"),
    ("bad.parquet", b"PAR1 not really", "bad.parquet: not a readable Parquet file"),
    ("data.txt", "hello", "data.txt: cannot tell the format"),
]


@pytest.mark.parametrize("name,content,message", MALFORMED, ids=[m[2][:40] for m in MALFORMED])
def test_malformed_input_is_refused_naming_where(name, content, message, tmp_path):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DatasetError) as caught:
        load_examples(path)
    assert message in caught.value.message
    assert isinstance(caught.value, errors.InvalidRequest)


def test_missing_dataset_and_format_detection(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")
    lines = tmp_path / "lines.json"
    lines.write_text(json.dumps(_openai("q", "a")) + "\n")
    assert detect_format(lines) == "jsonl"
    assert load_examples(lines) == [Example((("user", "q"), ("assistant", "a")))]


def test_loss_is_on_the_response_only_and_truncation(default_tokenizer):
    ex = Example(
        (
            ("user", "What is the capital of Zorblax?"),
            ("assistant", "Quendari."),
            ("user", "And of Blip?"),
            ("assistant", "Blop."),
        )
    )
    t = tokenize(ex, default_tokenizer, 512)
    assert len(t.input_ids) == len(t.labels)
    learned = default_tokenizer.decode([i for i, label in zip(t.input_ids, t.labels) if label != -100])
    assert learned.replace("<|im_end|>", "|").split("|")[:2] == ["Quendari.", "\nBlop."]
    assert "Zorblax" not in learned and "system" not in learned
    cut = tokenize(ex, default_tokenizer, len(t.input_ids) - 3)
    assert cut.input_ids == t.input_ids[:-3] and cut.labels == t.labels[:-3]
    assert tokenize(ex, default_tokenizer, 16) is None  # nothing of a response left


def test_spec_errors_name_the_field():
    with pytest.raises(errors.InvalidRequest, match="HyenaDNA is a family of genomic models"):
        TrainingSpec.parse({"base_model": "m", "dataset": "d", "method": "hyenadna"})
    with pytest.raises(errors.InvalidRequest, match="method: Input should be"):
        TrainingSpec.parse({"base_model": "m", "dataset": "d", "method": "qlora-ish"})
    with pytest.raises(errors.InvalidRequest, match="'script' goes with method 'custom'"):
        TrainingSpec.parse({"base_model": "m", "dataset": "d", "method": "custom"})
    with pytest.raises(errors.InvalidRequest, match="batch_size"):
        TrainingSpec.parse({"base_model": "m", "dataset": "d", "batch_size": 0})
