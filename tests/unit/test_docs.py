"""The docs against the code: docs/configuration-reference.md is generated from the
settings models and must be what they render now (run `make docs` after changing a
setting); every setting says what it is for; every route is in docs/api.md; every
local link resolves."""

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
    paths = {
        re.sub(r"\{(\w+)(:path)?\}", "{id}", p) for p in create_app(GatewaySettings()).openapi()["paths"]
    }
    named = set(re.findall(r"(/[\w/{}.-]+)", table))
    assert sorted(paths - named) == []


def test_every_local_link_in_the_docs_resolves():
    import re

    root = REFERENCE.parents[1]
    pages = [root / "README.md", root / "SECURITY.md", *sorted((root / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if (
                not target.startswith(("http://", "https://", "mailto:"))
                and not (page.parent / target).exists()
            ):
                broken.append(f"{page.relative_to(root)} -> {target}")
    assert broken == []


def test_the_committed_env_example_is_what_the_settings_render():
    from cyllm.config_reference import render_env

    example = Path(__file__).resolve().parents[2] / ".env.example"
    assert example.read_text() == render_env(), "run `make docs` and commit the result"
