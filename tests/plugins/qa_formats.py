"""A deployment's record shape: ``{"q": ..., "a": ...}`` — and two broken ones, to show
that a formatter's failures and bad output are the record's refusal, not a crash."""

from __future__ import annotations

from typing import Any

from cyllm.training.formats import BaseFormatter
from cyllm.training.records import Example, Record, example, text


class QA(BaseFormatter):
    name = "qa"

    def matches(self, record: dict[str, Any]) -> bool:
        return "q" in record and "a" in record

    def convert(self, record: dict[str, Any], where: str) -> Record:
        return example(where, [("user", text(where, record, "q")), ("assistant", text(where, record, "a"))])


class Careless(BaseFormatter):
    """Trusts its input: an empty answer or a missing key goes straight through."""

    name = "careless"

    def matches(self, record: dict[str, Any]) -> bool:
        return "question" in record

    def convert(self, record: dict[str, Any], where: str) -> Record:
        return Example((("user", record["question"]), ("assistant", record["answer"])))


class NotAFormatter:
    name = "nope"
