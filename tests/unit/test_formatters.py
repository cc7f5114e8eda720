"""Record shapes as registered formatters: the built-ins, and a deployment's own named in
the config, read under the same checks."""

from __future__ import annotations

import json

import pytest

from cyllm.coordinator.settings import CoordinatorSettings
from cyllm.training.data import DatasetError, Example, Reading, load_examples, load_records
from cyllm.training.formats import BUILT_IN, CONTAINERS, FormatterFactory, configured

PLUGINS = ("tests.plugins.qa_formats:QA", "tests.plugins.qa_formats:Careless")


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_each_built_in_shape_is_a_registered_formatter():
    names = FormatterFactory().names
    assert names == [f.name for f in BUILT_IN]
    for shape in (
        "openai",
        "sharegpt",
        "alpaca",
        "prompt_completion",
        "text_label",
        "openai_dpo",
        "pairs",
        "judged",
    ):
        assert shape in names
    assert not set(names) & set(CONTAINERS)


def test_a_deployments_formatter_is_detected_and_named(tmp_path):
    path = _jsonl(tmp_path / "qa.jsonl", [{"q": "What is Zorblax?", "a": "A green planet."}])
    expected = [Example((("user", "What is Zorblax?"), ("assistant", "A green planet.")))]
    assert load_examples(path, Reading(formatters=PLUGINS)) == expected  # detected
    assert load_examples(path, Reading("qa", formatters=PLUGINS)) == expected  # named
    with pytest.raises(DatasetError, match="line 1: not a training record.*found keys"):
        load_examples(path)  # a server without it
    other = _jsonl(tmp_path / "o.jsonl", [{"x": 1}])
    with pytest.raises(DatasetError, match="line 1: not a training record.*or this server's qa, careless"):
        load_examples(other, Reading(formatters=PLUGINS))
    with pytest.raises(DatasetError, match="unknown dataset_format 'qa'; known: json, jsonl"):
        load_examples(path, Reading("qa"))


def test_a_deployments_formatter_is_held_to_the_built_ins_checks(tmp_path):
    careless = Reading("careless", formatters=PLUGINS)
    empty = _jsonl(tmp_path / "e.jsonl", [{"question": "q", "answer": "a"}, {"question": "q", "answer": " "}])
    with pytest.raises(DatasetError, match=r"e.jsonl line 2: 'messages\[1\].content' is empty"):
        load_examples(empty, careless)
    missing = _jsonl(tmp_path / "m.jsonl", [{"question": "q"}])
    with pytest.raises(DatasetError, match="m.jsonl line 1: formatter 'careless': KeyError: 'answer'"):
        load_examples(missing, careless)
    mixed = _jsonl(
        tmp_path / "x.jsonl", [{"q": "q", "a": "a"}, {"messages": [{"role": "user", "content": "q"}]}]
    )
    with pytest.raises(DatasetError, match="x.jsonl line 2: a openai record in a dataset of qa records"):
        load_records(mixed, Reading(formatters=PLUGINS))


def test_a_formatter_that_cannot_be_loaded_stops_start_up():
    for bad, why in [
        ("tests.plugins.missing:QA", "cannot be loaded"),
        ("tests.plugins.qa_formats:Nothing", "cannot be loaded"),
        ("tests.plugins.qa_formats:NotAFormatter", "not a BaseFormatter class"),
        ("tests.plugins.qa_formats", "not a BaseFormatter class"),
    ]:
        with pytest.raises(ValueError, match=why):
            CoordinatorSettings(dataset_formatters=[bad])
    with pytest.raises(ValueError, match="'qa' is taken"):
        configured(("tests.plugins.qa_formats:QA", "tests.plugins.qa_formats:QA"))
    assert CoordinatorSettings(dataset_formatters=list(PLUGINS)).dataset_formatters == list(PLUGINS)
