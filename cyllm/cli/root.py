"""The ``cyllm`` command's root: ``--version``, ``--log-level``, shell completion, and the
options its subcommands share."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated

import typer

from cyllm.runtime import LOG_LEVEL_ENV

app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode="markdown",
    help="CY-LLM: serve and fine-tune LLMs.  Servers: **serve**, gateway, "
    "coordinator, worker.  Clients of a running gateway: chat, models, files, "
    "train, keys.",
)

ConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config",
        exists=True,
        dir_okay=False,
        help="YAML config file (sections: gateway, coordinator, worker, models, internal)",
        show_default=False,
    ),
]


def package_version() -> str:
    try:
        return version("cyllm")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cyllm {package_version()}")
        raise typer.Exit()


@app.callback()
def root(
    version_: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    log_level: Annotated[
        str | None,
        typer.Option(
            "--log-level",
            case_sensitive=False,
            show_default=False,
            help="DEBUG, INFO, WARNING or ERROR (the server processes inherit it; default INFO, "
            f"or ${LOG_LEVEL_ENV})",
        ),
    ] = None,
) -> None:
    if log_level is not None:
        level = log_level.upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise typer.BadParameter("one of DEBUG, INFO, WARNING, ERROR", param_hint="--log-level")
        os.environ[LOG_LEVEL_ENV] = level  # for this process and the ones it starts
