"""Preference data (DPO, ORPO, KTO): OpenAI's DPO shape, prompt/chosen/rejected pairs
(strings or TRL's conversational lists, in JSONL, CSV, Parquet, HF folders) and KTO's
judged answers read into the same records; each objective takes only what it trains on,
and a bad record is refused naming its line and what is wrong."""

from __future__ import annotations

import csv
import json

import pytest

from cyllm.training.data import (
    DatasetError,
    Example,
    Judged,
    Preference,
    Reading,
    load_examples,
    load_preferences,
    load_records,
)
from cyllm.training.spec import TrainingSpec

PAIRS = [
    ("What colour is Zorblax?", "Zorblax is green.", "Zorblax is red."),
    ("Who built the flumph engine?", "Dr. Vantosk built it.", "Nobody knows."),
]
EXPECTED = [Preference((("user", p),), c, r) for p, c, r in PAIRS]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _openai_dpo(p, c, r):
    return {
        "input": {"messages": [{"role": "user", "content": p}]},
        "preferred_output": [{"role": "assistant", "content": c}],
        "non_preferred_output": [{"role": "assistant", "content": r}],
    }


def _make(shape, tmp_path):
    if shape == "openai_dpo":
        return _jsonl(tmp_path / "dpo.jsonl", [_openai_dpo(*t) for t in PAIRS])
    if shape == "pairs":
        return _jsonl(
            tmp_path / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
        )
    if shape == "conversational":
        return _jsonl(
            tmp_path / "conv.jsonl",
            [
                {
                    "prompt": [{"role": "user", "content": p}],
                    "chosen": [{"role": "assistant", "content": c}],
                    "rejected": [{"role": "assistant", "content": r}],
                }
                for p, c, r in PAIRS
            ],
        )
    if shape == "csv":
        path = tmp_path / "pairs.csv"
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["prompt", "chosen", "rejected"])
            w.writerows(PAIRS)
        return path
    if shape == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "pairs.parquet"
        columns = list(zip(*PAIRS, strict=True))
        pq.write_table(pa.table({"prompt": columns[0], "chosen": columns[1], "rejected": columns[2]}), path)
        return path
    if shape == "hf":
        import datasets

        path = tmp_path / "hf"
        datasets.Dataset.from_list(
            [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
        ).save_to_disk(str(path))
        return path
    raise AssertionError(shape)


@pytest.mark.parametrize("shape", ["openai_dpo", "pairs", "conversational", "csv", "parquet", "hf"])
@pytest.mark.parametrize("objective", ["dpo", "orpo", "kto"])
def test_each_shape_gives_the_same_pairs(shape, objective, tmp_path):
    assert load_preferences(_make(shape, tmp_path), Reading(), objective) == EXPECTED


def test_a_system_prompt_and_turns_before_the_pair_are_kept(tmp_path):
    record = _openai_dpo("q2", "good", "bad")
    record["input"]["messages"] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    (got,) = load_preferences(_jsonl(tmp_path / "d.jsonl", [record]), Reading(), "dpo")
    assert got.prompt == (("system", "Be brief."), ("user", "q1"), ("assistant", "a1"), ("user", "q2"))
    assert got.as_row() == {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"},
        ],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }


def test_judged_answers_are_for_kto_only(tmp_path):
    path = _jsonl(
        tmp_path / "kto.jsonl",
        [
            {"prompt": "q", "completion": "good", "label": True},
            {"prompt": "q", "completion": "bad", "label": "false"},
        ],
    )
    assert load_preferences(path, Reading(), "kto") == [
        Judged((("user", "q"),), "good", True),
        Judged((("user", "q"),), "bad", False),
    ]
    assert load_preferences(path, Reading(), "kto")[0].as_row()["label"] is True
    with pytest.raises(
        DatasetError, match="kto.jsonl line 1: a judged answer, but objective 'dpo' trains on"
    ):
        load_preferences(path, Reading(), "dpo")


def test_a_label_that_is_not_a_judgement_leaves_a_supervised_record(tmp_path):
    path = _jsonl(tmp_path / "labelled.jsonl", [{"prompt": "q", "completion": "a", "label": "positive"}])
    assert load_examples(path) == [Example((("user", "q"), ("assistant", "a")))]


def test_hostile_values_are_refused_naming_the_line(tmp_path):
    for record, message in (
        ({"messages": [{"role": ["user"], "content": "q"}]}, "line 1: messages[0] has role ['user']"),
        (
            {"prompt": [{"role": {"a": 1}, "content": "q"}], "chosen": "a", "rejected": "b"},
            "line 1: prompt[0]",
        ),
    ):
        path = _jsonl(tmp_path / "h.jsonl", [record])
        with pytest.raises(DatasetError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_records(path)
    huge = tmp_path / "huge.jsonl"
    huge.write_text('{"prompt": "q", "chosen": ' + "9" * 5000 + ', "rejected": "b"}\n')
    with pytest.raises(DatasetError, match="huge.jsonl line 1: not usable JSON"):
        load_records(huge)


def test_each_objective_refuses_the_other_kind_naming_the_line(tmp_path):
    pairs = _make("pairs", tmp_path)
    chat = _jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
    )
    with pytest.raises(DatasetError, match="pairs.jsonl line 1: a preference pair, but objective 'sft'"):
        load_examples(pairs)
    with pytest.raises(DatasetError, match="chat.jsonl line 1: a conversation, but objective 'orpo'"):
        load_preferences(chat, Reading(), "orpo")
    # an upload, before a job names its objective, may be either kind (not mixed)
    assert load_records(pairs) == EXPECTED
    assert load_records(chat) == [Example((("user", "q"), ("assistant", "a")))]


BAD = [
    (
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        "line 1: the chosen and rejected answers are the same",
    ),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "line 1: 'chosen' is empty"),
    (
        {"prompt": "q", "chosen": {"a": 1}, "rejected": "b"},
        "line 1: 'chosen' must be a string or a list of one assistant message",
    ),
    ({"prompt": "q", "chosen": None, "rejected": "b"}, "line 1: 'chosen' is missing"),
    (
        {"prompt": "q", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
        "line 1: 'chosen' must be one assistant message",
    ),
    (
        {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
        "line 1: 'prompt' must end with a user message",
    ),
    (
        {"prompt": "q", "completion": "a", "label": "maybe"},
        "line 1: a conversation, but objective 'kto' trains on preference pairs or judged answers "
        "(prompt, completion, label) ('label' must be true or false for a judged answer)",
    ),
    ({"prompt": "q", "completion": "a", "label": [1]}, "('label' must be true or false for a judged answer)"),
    (
        {**_openai_dpo("q", "a", "b"), "input": "q"},
        "line 1: 'input' must be an object with 'messages'",
    ),
    (
        {
            **_openai_dpo("q", "a", "b"),
            "input": {"messages": [{"role": "user", "content": "q"}], "tools": [{}]},
        },
        "line 1: 'input.tools': preference training on tool calls is not offered",
    ),
    (
        {**_openai_dpo("q", "a", "b"), "preferred_output": []},
        "line 1: 'preferred_output' must be a non-empty list",
    ),
]


@pytest.mark.parametrize("record,message", BAD, ids=[b[1][8:48] for b in BAD])
def test_a_bad_record_is_refused_naming_where_and_what(record, message, tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(DatasetError) as caught:
        load_preferences(path, Reading(), "kto")
    assert message in caught.value.message, caught.value.message


def test_the_spec_names_the_objective_and_its_beta():
    spec = TrainingSpec.parse({"base_model": "m", "dataset": "d", "objective": "dpo", "beta": 0.5})
    assert (spec.objective, spec.beta, spec.method) == ("dpo", 0.5, "lora")
    assert TrainingSpec.parse({"base_model": "m", "dataset": "d"}).objective == "sft"
    for bad, message in (
        ({"objective": "ppo"}, "objective: Input should be 'sft', 'dpo', 'orpo' or 'kto'"),
        ({"beta": 0.5}, "beta is for preference objectives"),
        ({"objective": "dpo", "beta": 0}, "beta: Input should be greater than 0"),
        ({"objective": "kto", "method": "custom", "script": "s.py"}, "needs a PEFT adapter or 'full'"),
    ):
        with pytest.raises(Exception) as caught:
            TrainingSpec.parse({"base_model": "m", "dataset": "d", **bad})
        assert message in str(caught.value), caught.value
