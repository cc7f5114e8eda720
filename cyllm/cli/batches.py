"""``cyllm batch``: OpenAI's Batch API from the command line — submit a file of
requests, follow it, cancel it, download its results."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import httpx
import typer

from cyllm.cli.client import DEFAULT_URL, ApiKey, AsJson, Gateway, Url, _e, _fail, _listing, _message, out
from cyllm.cli.root import app

batch_app = typer.Typer(
    no_args_is_help=True, help="Run files of requests at the lowest priority (/v1/batches)."
)
app.add_typer(batch_app, name="batch")

FINAL = ("completed", "failed", "expired", "cancelled")
Endpoint = Annotated[
    str, typer.Option(help="What every line asks: /v1/chat/completions, /v1/completions or /v1/embeddings.")
]


def _show(batch: dict) -> None:
    c = batch["request_counts"]
    out.print(
        f"[bold]{_e(batch['id'])}[/] {_e(batch['status'])}: {c['completed']} done, {c['failed']} failed "
        f"of {c['total']} ({_e(batch['endpoint'])})",
        highlight=False,
    )
    for kind in ("output_file_id", "error_file_id"):
        if batch.get(kind):
            out.print(f"{kind.removesuffix('_id').replace('_', ' ')}: {_e(batch[kind])}", highlight=False)
    for error in (batch.get("errors") or {}).get("data", []):
        out.print(f"[red]{_e(error['code'])}: {_e(error['message'])}[/]", highlight=False)


@batch_app.command("submit")
def batch_submit(
    path: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="A JSONL file, one request a line.")
    ],
    endpoint: Endpoint = "/v1/chat/completions",
    window: Annotated[str, typer.Option("--window", help="The completion window, in hours.")] = "24h",
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow it until it ends; exit 1 unless completed.")
    ] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Upload the file (checked on arrival, refused with the line at fault) and run it."""
    gw = Gateway(url, api_key)
    with path.open("rb") as f:
        file_id = gw.call("POST", "/v1/files", data={"purpose": "batch"}, files={"file": (path.name, f)})[
            "id"
        ]
    batch = gw.call(
        "POST",
        "/v1/batches",
        json={"input_file_id": file_id, "endpoint": endpoint, "completion_window": window},
    )
    out.print(batch["id"])
    if wait:
        while batch["status"] not in FINAL:
            time.sleep(1.0)
            batch = gw.call("GET", f"/v1/batches/{batch['id']}")
        _show(batch)
        raise typer.Exit(0 if batch["status"] == "completed" else 1)


@batch_app.command("status")
def batch_status(
    batch_id: Annotated[str, typer.Argument(help="A batch id (batch_…).")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """One batch: its state, counts and files."""
    batch = Gateway(url, api_key).call("GET", f"/v1/batches/{batch_id}")
    if as_json:
        out.print_json(data=batch)
    else:
        _show(batch)


@batch_app.command("list")
def batch_list(url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """Your batches, newest first."""
    batches = Gateway(url, api_key).call("GET", "/v1/batches", params={"limit": 100})["data"]
    rows = [{**b, **b["request_counts"]} for b in batches]
    _listing(rows, ["id", "status", "endpoint", "total", "completed", "failed", "created_at"], as_json)


@batch_app.command("cancel")
def batch_cancel(
    batch_id: Annotated[str, typer.Argument(help="A batch id (batch_…).")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Stop a batch; what finished stays in its output file."""
    batch = Gateway(url, api_key).call("POST", f"/v1/batches/{batch_id}/cancel")
    out.print(f"{_e(batch['id'])} {_e(batch['status'])}")


@batch_app.command("download")
def batch_download(
    batch_id: Annotated[str, typer.Argument(help="A batch id (batch_…).")],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write here instead of printing.", dir_okay=False)
    ] = None,
    errors: Annotated[bool, typer.Option("--errors", help="The error file instead of the output.")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """A finished batch's output (or error) file, as OpenAI writes it: one JSON line a request."""
    gw = Gateway(url, api_key)
    batch = gw.call("GET", f"/v1/batches/{batch_id}")
    file_id = batch["error_file_id" if errors else "output_file_id"]
    if not file_id:
        _fail(f"batch {batch_id} has no {'error' if errors else 'output'} file ({batch['status']})")
    try:
        with gw.http.stream("GET", f"/v1/files/{file_id}/content") as reply:
            if reply.status_code >= 400:
                reply.read()
                _fail(_message(reply))
            if output is None:
                for text in reply.iter_text():
                    out.out(text, end="", highlight=False)
                return
            with output.open("wb") as f:
                for data in reply.iter_bytes():
                    f.write(data)
    except httpx.HTTPError as exc:
        _fail(f"connection to {gw.http.base_url} lost: {exc}")
    out.print(f"wrote {_e(output)}", highlight=False)
