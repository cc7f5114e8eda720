"""docs/configuration-reference.md is generated from the settings models: it must be
what they render now (run `make docs` after changing a setting), and every setting
must say what it is for."""

from __future__ import annotations

from pathlib import Path

from cyllm.config_reference import SECTIONS, render, undocumented

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "configuration-reference.md"


def test_every_setting_has_a_description():
    assert undocumented() == []


def test_the_committed_reference_is_what_the_settings_render():
    assert REFERENCE.read_text() == render(), "run `make docs` and commit the result"


def test_every_field_of_every_section_has_its_row():
    text = REFERENCE.read_text()
    for name, model, env in SECTIONS:
        section = text.split(f"## `{name}`\n", 1)[1].split("\n## ", 1)[0]
        for key in model.model_fields:
            assert f"| `{key}` |" in section, (name, key)
            if env:
                assert f"`{env}{key.upper()}`" in section


def test_every_route_is_in_the_api_reference():
    """docs/api.md's table names every route the gateway serves."""
    import re

    from cyllm.gateway.app import create_app
    from cyllm.gateway.settings import GatewaySettings

    text = (REFERENCE.parent / "api.md").read_text()
    table = text.split("\n\n", 1)[1].split("\n\n", 1)[0]
    paths = {re.sub(r"\{(\w+)(:path)?\}", "{id}", p)
             for p in create_app(GatewaySettings()).openapi()["paths"]}
    named = set(re.findall(r"(/[\w/{}.-]+)", table))
    assert sorted(paths - named) == []
