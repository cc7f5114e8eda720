"""Client commands against a running gateway, over its public HTTP API only (what a
script or the console could do too): models, aliases, files here; chat (``chat.py``),
train (``training.py``), batch (``batches.py``) beside, on the helpers defined here.

``--url`` / ``CYLLM_URL`` (default http://127.0.0.1:8080) and ``--api-key`` /
``CYLLM_API_KEY``.  An error answer is printed as the server wrote it (the OpenAI error
shape's message) and the command exits 1; listings take ``--json`` for scripts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Generator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cyllm.cli.root import app

Url = Annotated[str, typer.Option("--url", envvar="CYLLM_URL", help="The gateway's base URL.")]
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="CYLLM_API_KEY",
        show_default=False,
        help="An API key or JWT (when the gateway has authentication on).",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
DEFAULT_URL = "http://127.0.0.1:8080"

err = Console(stderr=True)
out = Console()

# What a server streams is printed as text: control characters (escape sequences that
# could move the cursor, retitle or clear the terminal) are dropped, newlines and tabs kept.
_CONTROL = {c: None for c in [*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)]}


def printable(text: str) -> str:
    return text.translate(_CONTROL)


def _e(value: object) -> str:
    """A server's value inside rich markup: printable, and never read as markup."""
    return escape(printable(str(value)))


class Gateway:
    """The gateway's HTTP API, errors turned into a message and exit 1."""

    def __init__(self, url: str, api_key: str | None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(
            base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(30.0, read=None)
        )

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON answer; a read over the caller's rate limit (429) waits as the server
        says (up to 30 s, three times) rather than failing a command that polls."""
        for attempt in range(4):
            reply = self._send(method, path, **kwargs)
            if reply.status_code != 429 or method != "GET" or attempt == 3:
                break
            try:
                wait = float(reply.headers.get("retry-after", "1"))
            except ValueError:
                wait = 1.0
            time.sleep(min(max(wait, 0.5), 30.0))
        if reply.status_code >= 400:
            _fail(_message(reply))
        return reply.json()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self.http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            _fail(self.unreachable(exc))
        except httpx.HTTPError as exc:
            _fail(f"the request to {self.http.base_url} failed: {exc}")

    def unreachable(self, exc: Exception) -> str:
        return (
            f"cannot reach {self.http.base_url} ({exc}): start one with `cyllm serve`, or name "
            "the gateway with --url or CYLLM_URL"
        )

    def events(self, path: str, **kwargs: Any) -> Generator[tuple[str, Any], None, None]:
        """Server-sent events as (event name, JSON data).  Closing the iterator ends the
        request (the server cancels the generation)."""
        try:
            with self.http.stream(kwargs.pop("method", "GET"), path, **kwargs) as reply:
                if reply.status_code >= 400:
                    reply.read()
                    _fail(_message(reply))
                event = "message"
                for line in reply.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data = line[5:].strip()
                        yield event, (data if data == "[DONE]" else json.loads(data))
                    elif not line:
                        event = "message"
        except httpx.ConnectError as exc:
            _fail(self.unreachable(exc))
        except httpx.HTTPError as exc:
            _fail(f"connection to {self.http.base_url} lost: {exc}")


def _message(reply: httpx.Response) -> str:
    try:
        error = reply.json()["error"]
        where = f" ({error['param']})" if error.get("param") else ""
        if reply.status_code == 401:
            where += "; pass an API key with --api-key or CYLLM_API_KEY"
        return f"{reply.status_code} {error['message']}{where}"
    except (ValueError, KeyError, TypeError):
        return f"{reply.status_code} {reply.text[:500]}"


def _fail(message: str) -> NoReturn:
    err.print(f"[red]error:[/] {_e(message)}", highlight=False)
    raise typer.Exit(1)


def _listing(rows: list[dict[str, Any]], columns: list[str], as_json: bool) -> None:
    """The rows as JSON (for scripts), or a table of ``columns``: the first (an id) never
    cut or wrapped, times (``created_at``, ``…_at``) as local dates."""
    if as_json:
        out.print_json(data=rows)
        return
    table = Table()
    for n, column in enumerate(columns):
        if n == 0:  # whole, unless the other columns would get under 6 cells each
            widest = max((cell_len(str(row.get(column) or "")) for row in rows), default=0)
            room = max(cell_len(column), out.width - 7 * (len(columns) - 1) - 4)
            table.add_column(column, no_wrap=True, min_width=min(max(widest, cell_len(column)), room))
        else:
            table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(c, row.get(c)) for c in columns))
    out.print(table)


def _cell(column: str, value: object) -> str:
    if value is None:
        return ""
    dated = column == "created" or column.endswith("_at") or column.endswith("At")
    if dated and isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e11:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(value))
    return _e(value)


# -- models -------------------------------------------------------------------------------

models_app = typer.Typer(
    no_args_is_help=True, help="List, load and unload models; show, delete, publish and export yours."
)
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """What the cluster serves (loaded) and can load (available)."""
    models = Gateway(url, api_key).call("GET", "/api/v1/models")["models"]
    _listing(models, ["id", "state", "engine", "device", "contextLength", "base"], as_json)


@models_app.command("load")
def models_load(
    model: Annotated[str, typer.Argument(help="A catalog model id, or <base>:<adapter>.")],
    adapter_path: Annotated[
        str | None,
        typer.Option(help="For <base>:<adapter>: the PEFT folder on the worker.", show_default=False),
    ] = None,
    worker: Annotated[str | None, typer.Option(help="Load on this worker id.", show_default=False)] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Load a model (admin)."""
    body = {k: v for k, v in {"adapterPath": adapter_path, "workerId": worker}.items() if v}
    reply = Gateway(url, api_key).call("POST", f"/api/v1/models/{model}/load", json=body)
    evicted = f" (unloaded {', '.join(reply['evicted'])})" if reply["evicted"] else ""
    out.print(f"loaded {_e(model)} on {_e(reply['workerId'])}{_e(evicted)}", highlight=False)


@models_app.command("unload")
def models_unload(
    model: Annotated[str, typer.Argument(help="A loaded model id.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Unload a model from every worker (admin)."""
    reply = Gateway(url, api_key).call("POST", f"/api/v1/models/{model}/unload")
    out.print(
        f"unloaded {_e(model)} from {_e(', '.join(reply['workerIds']) or 'no worker')}", highlight=False
    )


@models_app.command("show")
def models_show(
    model: Annotated[str, typer.Argument(help="A model id.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """One model: its state, base, kind, the job that made it, its evaluation, your
    aliases on it, whom it is published to and where its artefact lives."""
    entry = Gateway(url, api_key).call("GET", f"/api/v1/models/{model}")
    if as_json:
        out.print_json(data=entry)
        return
    for key in ("id", "state", "base", "kind", "jobId", "evaluation", "aliases", "publishedTo", "path"):
        if entry.get(key) not in (None, [], {}):
            out.print(f"{key}: {_e(entry[key])}", highlight=False)


@models_app.command("delete")
def models_delete(
    model: Annotated[str, typer.Argument(help="A model you made.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Delete a model you made: no longer served or listed, its artefact removed."""
    Gateway(url, api_key).call("DELETE", f"/api/v1/models/{model}")
    out.print(f"deleted {_e(model)}", highlight=False)


@models_app.command("publish")
def models_publish(
    model: Annotated[str, typer.Argument(help="A model made here.")],
    tenant: Annotated[
        list[str] | None,
        typer.Option(
            "--tenant", help="A tenant to publish to (repeat); none: --everyone.", show_default=False
        ),
    ] = None,
    everyone: Annotated[bool, typer.Option(help="Publish to every tenant.")] = False,
    withdraw: Annotated[bool, typer.Option(help="Back to its owner only.")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Publish a model to other tenants, or withdraw it (admin)."""
    if not (tenant or everyone or withdraw):
        _fail("give --tenant, --everyone or --withdraw")
    body = {"tenants": tenant or [], "everyone": everyone, "withdraw": withdraw}
    entry = Gateway(url, api_key).call("POST", f"/api/v1/models/{model}/publish", json=body)
    out.print(f"{_e(model)} published to {_e(', '.join(entry['publishedTo'] or []) or 'its owner')}")


@models_app.command("export")
def models_export(
    model: Annotated[str, typer.Argument(help="A model you made.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Where to write the tar archive.", show_default=False)
    ],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Download a model you made (its adapter or model folder) as a tar archive."""
    gw = Gateway(url, api_key)
    try:
        with gw.http.stream("GET", f"/api/v1/models/{model}/export") as reply:
            if reply.status_code >= 400:
                reply.read()
                _fail(_message(reply))
            with output.open("wb") as f:
                for chunk in reply.iter_bytes():
                    f.write(chunk)
    except httpx.HTTPError as exc:
        _fail(f"download from {gw.http.base_url} failed: {exc}")
    out.print(f"wrote {_e(output)} ({output.stat().st_size} bytes)", highlight=False)


# -- aliases ------------------------------------------------------------------------------

aliases_app = typer.Typer(
    no_args_is_help=True, help="Your stable names for models: set, show (with history), roll back, delete."
)
app.add_typer(aliases_app, name="aliases")


@aliases_app.command("list")
def aliases_list(url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """Your aliases and where they point."""
    _listing(Gateway(url, api_key).call("GET", "/api/v1/aliases")["aliases"], ["name", "model"], as_json)


@aliases_app.command("set")
def aliases_set(
    name: Annotated[str, typer.Argument(help="The alias (1-64 letters, digits, '.', '_', '-').")],
    model: Annotated[str, typer.Argument(help="The model it points at from now on.")],
    expect: Annotated[
        str | None, typer.Option(help="Move only if it points at this model now.", show_default=False)
    ] = None,
    reason: Annotated[str | None, typer.Option(help="Kept in its history.", show_default=False)] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Point an alias at a model (atomically; recorded)."""
    body = {k: v for k, v in {"model": model, "expect": expect, "reason": reason}.items() if v is not None}
    entry = Gateway(url, api_key).call("PUT", f"/api/v1/aliases/{name}", json=body)
    out.print(f"{_e(entry['name'])} -> {_e(entry['model'])}", highlight=False)


@aliases_app.command("show")
def aliases_show(
    name: Annotated[str, typer.Argument(help="An alias of yours.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Where an alias points, and its moves (oldest first)."""
    entry = Gateway(url, api_key).call("GET", f"/api/v1/aliases/{name}")
    if as_json:
        out.print_json(data=entry)
        return
    out.print(f"{_e(entry['name'])} -> {_e(entry['model'])}", highlight=False)
    moves = [
        {**m, "at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["at"]))} for m in entry["moves"] or []
    ]
    _listing(moves, ["at", "fromModel", "toModel", "by", "reason"], False)


@aliases_app.command("rollback")
def aliases_rollback(
    name: Annotated[str, typer.Argument(help="An alias of yours.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Point an alias back where it was before its last move."""
    entry = Gateway(url, api_key).call("POST", f"/api/v1/aliases/{name}/rollback")
    out.print(f"{_e(entry['name'])} -> {_e(entry['model'])}", highlight=False)


@aliases_app.command("delete")
def aliases_delete(
    name: Annotated[str, typer.Argument(help="An alias of yours.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Remove an alias (the model stays)."""
    Gateway(url, api_key).call("DELETE", f"/api/v1/aliases/{name}")
    out.print(f"deleted alias {_e(name)}", highlight=False)


# -- files --------------------------------------------------------------------------------

files_app = typer.Typer(no_args_is_help=True, help="Upload, list, show and delete files (datasets, batches).")
app.add_typer(files_app, name="files")


@files_app.command("upload")
def files_upload(
    path: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="A JSONL, JSON, CSV or Parquet file.")
    ],
    purpose: Annotated[str, typer.Option(help="What the file is for.")] = "fine-tune",
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Upload a dataset; it is checked on arrival and refused with the line at fault."""
    with path.open("rb") as f:
        reply = Gateway(url, api_key).call(
            "POST", "/v1/files", data={"purpose": purpose}, files={"file": (path.name, f)}
        )
    out.print(reply["id"])


@files_app.command("list")
def files_list(url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """Your uploaded files."""
    files = Gateway(url, api_key).call("GET", "/v1/files")["data"]
    _listing(files, ["id", "filename", "bytes", "purpose", "created_at"], as_json)


@files_app.command("show")
def files_show(
    file_id: Annotated[str, typer.Argument(help="A file id (file-…).")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """One file: name, size, purpose, when."""
    f = Gateway(url, api_key).call("GET", f"/v1/files/{file_id}")
    out.print(
        f"[bold]{_e(f['id'])}[/] {_e(f['filename'])}: {_e(f['bytes'])} bytes, {_e(f['purpose'])}, "
        f"{_cell('created_at', f['created_at'])}",
        highlight=False,
    )


@files_app.command("delete")
def files_delete(
    file_id: Annotated[str, typer.Argument(help="A file id (file-…).")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Delete an uploaded file."""
    Gateway(url, api_key).call("DELETE", f"/v1/files/{file_id}")
    out.print(f"deleted {_e(file_id)}")
