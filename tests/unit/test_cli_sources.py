"""``cyllm serve MODEL``: what MODEL names, and the id it is served under; and the
client commands printing a server's text as text."""

from __future__ import annotations

import pytest

from cyllm.cli.sources import SourceError, model_spec, name_of


def test_a_folder_a_gguf_and_a_hub_id_are_told_apart(tmp_path):
    folder = tmp_path / "My Model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    gguf = tmp_path / "tiny.Q4_0.gguf"
    gguf.write_bytes(b"GGUF")
    spec = model_spec(str(folder), None, engine="transformers", max_context=None)
    assert spec.path == folder.resolve() and spec.engine == "transformers"
    assert spec.id == "My-Model"  # spaces are not allowed in an id
    spec = model_spec(str(gguf), "tiny", max_batch_size=4)
    assert spec.gguf == str(gguf.resolve()) and spec.id == "tiny" and spec.max_batch_size == 4
    assert name_of("HuggingFaceTB/SmolLM2-135M-Instruct@main") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert name_of(str(gguf)) == "tiny.Q4_0"


@pytest.mark.parametrize(
    "model, says",
    [
        ("/etc/passwd", "is a file but not a .gguf"),
        ("/etc", "without config.json"),
        ("a/b/c", "neither a local folder"),
        ("org/name;rm -rf", "neither a local folder"),
        ("./model.Q4_K_M.gguf", "no such file or folder"),
        ("/srv/gone", "no such file or folder"),
    ],
)
def test_what_is_not_a_model_is_refused_by_name(model, says):
    with pytest.raises(SourceError, match=says):
        model_spec(model, None)


def test_a_bad_flag_value_is_refused_with_the_spec_message(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SourceError, match="dtype"):
        model_spec(str(tmp_path), None, dtype="float8")


def test_chat_prints_a_servers_text_without_terminal_control_sequences():
    from cyllm.cli.client import printable

    assert printable("Paris\x1b]0;pwned\x07\x1b[2J.\n\tok\r\x9b") == "Paris]0;pwned[2J.\n\tok"


def test_server_text_in_the_clis_markup_is_text(capsys):
    from rich.console import Console

    from cyllm.cli.client import _e

    console = Console(force_terminal=False, width=200)
    hostile = "bad [/] value [bold]x[/bold] \x1b[2J"
    console.print(f"[red]error:[/] {_e(hostile)}")
    assert "bad [/] value [bold]x[/bold] [2J" in capsys.readouterr().out
