"""JSON Schemas that callers send (``response_format``, tool parameters): checked at
the edge, so a bad one is a 400 naming where it is wrong, and bounded, since the
worker compiles each into a grammar.

Only keywords the grammar enforces are accepted (and annotations, which constrain
nothing): a keyword it would silently ignore (``not``, ``if``, ``multipleOf``,
``uniqueItems``, ``oneOf``'s "exactly one", ...) could let through an output that does
not validate, so it is refused, by name and place, instead."""

from __future__ import annotations

import contextvars
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import regex

from cyllm import errors

ENFORCED = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "enum",
        "const",
        "anyOf",
        "$ref",
        "$defs",
        "definitions",
        "minLength",
        "maxLength",
        "pattern",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
    }
)
ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "format",
        "deprecated",
        "readOnly",
        "writeOnly",
    }
)
# Keywords whose value holds subschemas: by name, or a map of names to subschemas.
_SUBSCHEMA = frozenset({"items", "additionalProperties"})
_SUBSCHEMA_LISTS = frozenset({"prefixItems", "anyOf"})
_SUBSCHEMA_MAPS = frozenset({"properties", "$defs", "definitions"})

MAX_SCHEMA_BYTES = 32 * 1024
MAX_DEPTH = 32
PARAM = "response_format"


@dataclass(frozen=True)
class Constraint:
    """What an output is held to: ``json_object`` (any JSON object), or ``json_schema``
    with the schema as canonical JSON text (checked by :func:`check_schema`)."""

    kind: str
    json_schema: str = ""


def constraint_of(kind: str, schema: Any) -> Constraint | None:
    """A response format (``text``, ``json_object``, ``json_schema`` with ``schema``) as
    the worker's constraint: None for free text."""
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object")
    return Constraint("json_schema", check_schema(schema))


def check_schema(schema: Any, param: str = PARAM, what: str = "response_format.json_schema.schema") -> str:
    """``schema`` as canonical JSON text, or InvalidRequest naming what is wrong: not an
    object, too large or too deep, or invalid against its draft's meta-schema."""
    import jsonschema

    if not isinstance(schema, dict):
        raise errors.InvalidRequest(f"{what} must be a JSON object", param=param)
    text = json.dumps(schema, separators=(",", ":"))  # in the caller's order: properties are generated in it
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise errors.InvalidRequest(f"{what} is larger than {MAX_SCHEMA_BYTES} bytes", param=param)
    if _depth(schema) > MAX_DEPTH:
        raise errors.InvalidRequest(f"{what} nests deeper than {MAX_DEPTH} levels", param=param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise errors.InvalidRequest(
            f"{what} is not a valid JSON Schema at {where}: {exc.message}", param=param
        ) from None
    for where, keyword in _keywords(schema):
        if keyword not in ENFORCED and keyword not in ANNOTATIONS:
            raise errors.InvalidRequest(
                f"{what} uses {keyword!r} at {where}, which constrained decoding cannot enforce; "
                f"the supported keywords are {', '.join(sorted(ENFORCED))}",
                param=param,
            )
    return text


def _keywords(schema: dict) -> list[tuple[str, str]]:
    """(place, keyword) for every keyword of every subschema."""
    found, todo = [], [("#", schema)]
    while todo:
        where, node = todo.pop()
        if not isinstance(node, dict):
            continue  # true/false schemas
        for key, value in node.items():
            found.append((where, key))
            if key in _SUBSCHEMA:
                todo.append((f"{where}/{key}", value))
            elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
                todo.extend((f"{where}/{key}/{i}", v) for i, v in enumerate(value))
            elif key in _SUBSCHEMA_MAPS and isinstance(value, dict):
                todo.extend((f"{where}/{key}/{name}", v) for name, v in value.items())
    return found


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value, without recursion (a hostile one may be deep)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        todo.extend((child, depth + 1) for child in children)
    return deepest


# Validating a model's output against a caller's schema runs the caller's regular
# expressions ("pattern") on text the caller can steer: with Python's backtracking
# ``re``, ``^(a|a)*$`` against 30 "a"s and a "!" takes minutes, on the event loop.
# They run in the ``regex`` module instead, under one time budget for the whole
# validation: past it the output is taken as not matching.
PATTERN_BUDGET_S = 0.1
_DEADLINE: contextvars.ContextVar[float] = contextvars.ContextVar("pattern_deadline", default=0.0)
_BOUNDED: dict[type, type] = {}


def _pattern(validator: Any, pattern: str, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    import jsonschema

    if not validator.is_type(instance, "string"):
        return
    left = _DEADLINE.get() - time.monotonic()
    try:
        matched = left > 0 and regex.search(pattern, instance, timeout=left) is not None
    except TimeoutError:
        matched = False
    except regex.error as exc:
        yield jsonschema.ValidationError(f"pattern {pattern[:100]!r} is not a regular expression: {exc}")
        return
    if not matched:
        yield jsonschema.ValidationError(f"{instance[:100]!r} does not match {pattern[:100]!r} (in time)")


def valid(instance: Any, schema: dict[str, Any], deadline: float) -> bool:
    """Whether ``instance`` validates against ``schema`` (checked by :func:`check_schema`),
    its patterns run until ``deadline`` (``time.monotonic()``) at the latest: pass one
    deadline to every validation of one answer (``PATTERN_BUDGET_S`` from its start)."""
    import jsonschema

    base = jsonschema.validators.validator_for(schema)
    bounded = _BOUNDED.get(base)
    if bounded is None:
        bounded = _BOUNDED[base] = jsonschema.validators.extend(base, {"pattern": _pattern})
    token = _DEADLINE.set(deadline)
    try:
        return bounded(schema).is_valid(instance)
    finally:
        _DEADLINE.reset(token)
