"""The configuration reference, generated from the settings models so that it cannot
drift from them: every section's keys with their type, default, environment variable
and description; and ``.env.example``, every environment variable with its meaning.
``make docs`` writes both; a test fails when a file differs from what this renders, or
when a setting has no description.

    python -m cyllm.config_reference > docs/configuration-reference.md
    python -m cyllm.config_reference --env > .env.example
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined, to_jsonable_python

from cyllm.coordinator.settings import CoordinatorSettings
from cyllm.gateway.settings import GatewaySettings
from cyllm.protocol.plane import InternalSettings
from cyllm.worker.settings import EngineCandidate, ModelSpec, WorkerSettings

SECTIONS: list[tuple[str, type[BaseModel], str | None]] = [
    ("gateway", GatewaySettings, "CYLLM_GATEWAY_"),
    ("coordinator", CoordinatorSettings, "CYLLM_COORDINATOR_"),
    ("worker", WorkerSettings, "CYLLM_WORKER_"),
    ("internal", InternalSettings, "CYLLM_INTERNAL_"),
    ("models[]", ModelSpec, None),
    ("models[].candidates[]", EngineCandidate, None),
]

HEADER = """# Configuration reference

Generated from the settings models by `python -m cyllm.config_reference` (`make docs`);
do not edit by hand. How the file, the environment and the flags combine is in
[configuration.md](configuration.md). Environment variables hold lists and maps as JSON.
`models` is a top-level section of the file (the workers read it); the worker's
`models` setting is the same list.
"""


def _type(annotation: Any) -> str:
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    text = re.sub(r"\b(typing|pathlib|pydantic\.types|cyllm\.[\w.]+)\.", "", text)
    text = text.replace("NoneType", "None").replace("Literal", "one of ")
    return text.replace("|", "\\|")


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return "the built-in model"
    if isinstance(value, Path):
        home = Path.home()
        return f"`~/{value.relative_to(home)}`" if value.is_relative_to(home) else f"`{value}`"
    return f"`{json.dumps(to_jsonable_python(value))}`"


def render() -> str:
    out = [HEADER]
    for name, model, env in SECTIONS:
        out.append(f"\n## `{name}`\n")
        doc = (model.__doc__ or "").strip().split("\n\n")[0]
        if doc and name.startswith("models"):
            out.append(" ".join(doc.split()) + "\n")
        columns = ["key", "type", "default"] + (["environment"] if env else []) + ["what"]
        out.append("| " + " | ".join(columns) + " |")
        out.append("|" + "---|" * len(columns))
        for key, field in model.model_fields.items():
            row = [f"`{key}`", _type(field.annotation), _default(field)]
            if env:
                row.append(f"`{env}{key.upper()}`")
            row.append((field.description or "").replace("|", "\\|"))
            out.append("| " + " | ".join(row) + " |")
    return "\n".join(out) + "\n"


ENV_HEADER = """\
# CY-LLM's settings as environment variables: copy this file to .env (read from the
# working directory of every cyllm command; a variable set in the environment wins over
# the file, the file over the config file given with --config, that over the defaults).
# Lists and mappings are JSON.  Generated from the settings by
# `python -m cyllm.config_reference --env` (make docs): do not edit by hand.
# Keep secrets (CYLLM_INTERNAL_TOKEN, CYLLM_GATEWAY_JWT_SECRET) out of version control.
"""


def render_env() -> str:
    out = [ENV_HEADER]
    for name, model, env in SECTIONS:
        if not env:
            continue
        out.append(f"\n# -- {name}")
        for key, field in model.model_fields.items():
            default = _default(field).strip("`")
            what = " ".join((field.description or "").split())
            out.append(f"# {what} (default: {default})" if default else f"# {what}")
            out.append(f"#{env}{key.upper()}=")
    return "\n".join(out) + "\n"


def undocumented() -> list[str]:
    return [
        f"{name}.{key}"
        for name, model, _ in SECTIONS
        for key, field in model.model_fields.items()
        if not field.description
    ]


if __name__ == "__main__":
    import sys

    print(render_env() if sys.argv[1:] == ["--env"] else render(), end="")
