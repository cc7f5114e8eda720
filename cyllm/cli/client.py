"""Client commands against a running gateway, over its public HTTP API only (what a
script or the console could do too): chat, models, aliases, files, train, keys.

``--url`` / ``CYLLM_URL`` (default http://127.0.0.1:8080) and ``--api-key`` /
``CYLLM_API_KEY``.  An error answer is printed as the server wrote it (the OpenAI error
shape's message) and the command exits 1; listings take ``--json`` for scripts.
"""

from __future__ import annotations

import json
import re
import sys
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
from cyllm.training.verdict import verdict

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


# -- chat ---------------------------------------------------------------------------------


@app.command()
def chat(
    model: Annotated[
        str | None,
        typer.Argument(help="A served model id; default: the first the gateway lists.", show_default=False),
    ] = None,
    system: Annotated[str | None, typer.Option(help="A system prompt.", show_default=False)] = None,
    temperature: Annotated[
        float | None,
        typer.Option(min=0, max=2, help="Sampling temperature; default: the model's.", show_default=False),
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens per answer at most.")] = 512,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Chat in the terminal, answers streamed; the conversation is kept until /reset.

    Type a message and Enter (arrow keys edit the line and recall earlier ones); Ctrl-C
    stops an answer, /reset forgets the conversation, /exit (or Ctrl-D) leaves.  A
    refused message is not kept: send it again, or another.
    """
    gw = Gateway(url, api_key)
    if model is None:
        served = gw.call("GET", "/v1/models")["data"]
        if not served:
            _fail("the gateway serves no model")
        model = served[0]["id"]
    interactive = sys.stdin.isatty()
    refused = False  # piped: the exit status says whether every message was answered
    if interactive:
        try:
            import readline  # noqa: F401  (input() gets line editing and this session's history)
        except ImportError:  # not on every platform: plain input()
            pass

        err.print(
            f"[bold]{_e(model)}[/] at {_e(url)} — Ctrl-C stops an answer; /reset, /exit", highlight=False
        )
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            raise typer.Exit(1 if refused else 0) from None
        except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
            sys.stdout.write("\n")
            continue
        if line.strip() == "/exit":
            raise typer.Exit(1 if refused else 0)
        if line.strip() == "/reset":
            history = history[:1] if system else []
            err.print("[dim](conversation reset)[/]")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        body: dict[str, Any] = {
            "model": model,
            "messages": history,
            "stream": True,
            "max_tokens": max_tokens,
            "stream_options": {"include_usage": True},
        }
        if temperature is not None:
            body["temperature"] = temperature
        answer: list[str] = []
        usage, first, start = None, None, time.perf_counter()
        events = gw.events("/v1/chat/completions", method="POST", json=body)
        try:
            for _, data in events:
                if data == "[DONE]":
                    break
                if "error" in data:
                    _fail(data["error"].get("message", "the generation failed"))
                usage = data.get("usage") or usage
                for choice in data.get("choices", ()):
                    piece = choice["delta"].get("content") or ""
                    if piece and first is None:
                        first = time.perf_counter()
                    answer.append(piece)
                    sys.stdout.write(printable(piece))
                    sys.stdout.flush()
        except KeyboardInterrupt:  # the answer stops (the server cancels it); the chat goes on
            events.close()
            err.print("\n[dim](stopped)[/]", highlight=False)
            usage = None
        except typer.Exit:  # refused or failed: said above; the conversation stays as it was
            events.close()
            history.pop()
            refused = not interactive
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(answer)})
        if usage and first is not None:
            took = time.perf_counter() - first
            rate = usage["completion_tokens"] / took if took > 0 else 0.0
            err.print(
                f"[dim]{_e(usage['completion_tokens'])} tokens, first after "
                f"{(first - start) * 1000:.0f} ms, {rate:.1f} tokens/s[/]",
                highlight=False,
            )


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


# -- training -----------------------------------------------------------------------------

train_app = typer.Typer(no_args_is_help=True, help="Submit, follow and cancel fine-tuning jobs.")
app.add_typer(train_app, name="train")


@train_app.command("submit")
def train_submit(
    model: Annotated[str, typer.Option("--model", help="The base model id.")],
    file: Annotated[
        str | None,
        typer.Option(help="An uploaded file id, or a local file to upload first.", show_default=False),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(help="A dataset path on the workers' disk (instead of --file).", show_default=False),
    ] = None,
    validation_file: Annotated[
        str | None,
        typer.Option(
            help="Held-out examples for the eval loss: a file id or a local file.", show_default=False
        ),
    ] = None,
    method: Annotated[str, typer.Option(help="lora, dora, full, … (see the README).")] = "lora",
    objective: Annotated[
        str | None,
        typer.Option(
            help="sft (default), or preference training on pairs: dpo, orpo, kto.", show_default=False
        ),
    ] = None,
    beta: Annotated[
        float | None, typer.Option(help="dpo, orpo, kto: TRL's beta (default 0.1).", show_default=False)
    ] = None,
    processes: Annotated[
        int | None, typer.Option(help="Data-parallel processes (torchrun).", show_default=False)
    ] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the data.", show_default=False)] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after N steps.", show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option(show_default=False, help="Examples per step.")] = None,
    learning_rate: Annotated[
        float | None, typer.Option(show_default=False, help="Default: the method's.")
    ] = None,
    suffix: Annotated[
        str | None, typer.Option(show_default=False, help="Part of the result model's name.")
    ] = None,
    promote_to: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help="Point this alias of yours at the result if it beats the alias's current target on "
            "the validation data (needs --validation-file).",
        ),
    ] = None,
    report_to: Annotated[
        str | None,
        typer.Option(help="'tensorboard': write TensorBoard logs into the job folder.", show_default=False),
    ] = None,
    watch: Annotated[bool, typer.Option(help="Follow the job until it ends.")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Start a fine-tuning job and print its id."""
    if (file is None) == (dataset is None):
        _fail("give exactly one of --file and --dataset")
    gw = Gateway(url, api_key)
    body: dict[str, Any] = {"baseModel": model, "method": method}
    if file is not None:
        body["fileId"] = _file_id(gw, file)
    else:
        body["dataset"] = dataset
    if validation_file is not None:
        body["validationFileId"] = _file_id(gw, validation_file)
    for key, value in (
        ("objective", objective),
        ("beta", beta),
        ("processes", processes),
        ("epochs", epochs),
        ("maxSteps", max_steps),
        ("batchSize", batch_size),
        ("learningRate", learning_rate),
        ("suffix", suffix),
        ("promoteTo", promote_to),
        ("reportTo", report_to),
    ):
        if value is not None:
            body[key] = value
    job = gw.call("POST", "/api/v1/training/start", json=body)
    out.print(job["id"])
    if watch:
        raise typer.Exit(_watch(gw, job["id"]))


def _file_id(gw: Gateway, name: str) -> str:
    path = Path(name)
    if not path.is_file():
        return name
    with path.open("rb") as f:
        return gw.call("POST", "/v1/files", data={"purpose": "fine-tune"}, files={"file": (path.name, f)})[
            "id"
        ]


@train_app.command("list")
def train_list(
    limit: Annotated[int, typer.Option(min=1, max=100, help="Newest first.")] = 20,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Your fine-tuning jobs."""
    jobs = Gateway(url, api_key).call("GET", "/api/v1/training/jobs", params={"limit": limit})["jobs"]
    rows = (
        jobs
        if as_json
        else [
            {**j, "step": f"{j['progress']['step']}/{j['progress']['totalSteps']}" if j["progress"] else ""}
            for j in jobs
        ]
    )
    _listing(rows, ["id", "state", "baseModel", "method", "step", "fineTunedModel"], as_json)


@train_app.command("status")
def train_status(
    job_id: Annotated[str, typer.Argument(help="A job id.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """One job: state, progress, checkpoints, result or error."""
    job = Gateway(url, api_key).call("GET", f"/api/v1/training/status/{job_id}")
    if as_json:
        out.print_json(data=job)
        return
    p = job["progress"] or {}
    out.print(
        f"[bold]{_e(job['id'])}[/] {_e(job['state'])}: {_e(job['method'])} on {_e(job['baseModel'])}",
        highlight=False,
    )
    if p:
        out.print(
            f"step {_e(p['step'])}/{_e(p['totalSteps'])}, loss {_e(p['loss'])}, "
            f"{p['tokensPerSecond']:.0f} tokens/s",
            highlight=False,
        )
    for c in job["checkpoints"]:
        out.print(f"checkpoint step {_e(c['step'])}: {_e(c['path'])}", highlight=False)
    if job["fineTunedModel"]:
        out.print(f"result: {_e(job['fineTunedModel'])}", highlight=False)
    _evaluation(job)
    if job.get("promotion"):
        out.print(_e(job["promotion"]), highlight=False)
    if job["error"]:
        out.print(f"[red]{_e(job['error']['code'])}: {_e(job['error']['message'])}[/]", highlight=False)


@train_app.command("cancel")
def train_cancel(
    job_id: Annotated[str, typer.Argument(help="A job id.")], url: Url = DEFAULT_URL, api_key: ApiKey = None
) -> None:
    """Stop a queued or running job."""
    job = Gateway(url, api_key).call("POST", f"/api/v1/training/cancel/{job_id}")
    out.print(f"{_e(job['id'])} {_e(job['state'])}")


@train_app.command("watch")
def train_watch(
    job_id: Annotated[str, typer.Argument(help="A job id.")], url: Url = DEFAULT_URL, api_key: ApiKey = None
) -> None:
    """Follow a job live: a progress bar with step, loss, tokens/s and ETA, and a loss
    sparkline; exits 0 when it succeeds, 1 otherwise."""
    raise typer.Exit(_watch(Gateway(url, api_key), job_id))


SPARKS = "▁▂▃▄▅▆▇█"
# A line of a library's own progress bar (tqdm: "45%|████▌     | 9/20 [00:03<00:04, ...]").
PROGRESS_BAR = re.compile(r"\d+%\|.*\|\s*\d+/\d+|\r")


def _evaluation(job: dict[str, Any]) -> None:
    """The base and the result scored, and the verdict, rounded."""
    for key, value in sorted((job.get("evaluation") or {}).items()):
        out.print(f"{_e(key)}: {value:.4f}", highlight=False)
    if judged := verdict(job.get("evaluation") or {}):
        out.print(_e(judged), highlight=False)


@train_app.command("logs")
def train_logs(
    job_id: Annotated[str, typer.Argument(help="A job id.")],
    limit: Annotated[int, typer.Option(min=1, max=1000, help="The last this many.")] = 100,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """A job's event log, oldest first: states, progress, checkpoints, messages."""
    events = Gateway(url, api_key).call(
        "GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": limit}
    )["data"]
    for e in reversed(events):
        stamp = time.strftime("%H:%M:%S", time.localtime(e["created_at"]))
        out.print(f"[dim]{stamp}[/] {_e(e['level'])[:4]:4} {_e(e['message'])}", highlight=False)


def sparkline(values: list[float], width: int = 40) -> str:
    """The last ``width`` values as block characters, lowest to highest."""
    values = values[-width:]
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(SPARKS[min(len(SPARKS) - 1, int((v - low) / span * len(SPARKS)))] for v in values)


def _watch(gw: Gateway, job_id: str) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    losses: list[float] = []
    state = ""
    columns = [
        TextColumn("[bold]{task.fields[state]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("eval {task.fields[eval]}"),
        TextColumn("{task.fields[rate]} tok/s"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[spark]}"),
    ]
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task("train", total=None, state="queued", loss="-", eval="-", rate="-", spark="")
        for kind, event in gw.events(f"/api/v1/training/stream/{job_id}"):
            if kind == "error":
                _fail(event["error"]["message"])
            if kind == "state":
                state = event["state"]
                bar.update(task, state=_e(state))
            elif kind == "metrics":
                p = event["progress"]
                if p.get("loss") is not None:
                    losses.append(p["loss"])
                bar.update(
                    task,
                    completed=p["step"],
                    total=p["totalSteps"] or None,
                    loss=f"{p['loss']:.4f}" if p.get("loss") is not None else "-",
                    rate=f"{p['tokensPerSecond']:.0f}",
                    spark=sparkline(losses),
                )
                if p.get("evalLoss") is not None:
                    bar.update(task, eval=f"{p['evalLoss']:.4f}")
            elif kind in ("message", "checkpoint", "evaluation", "promotion") and event.get("message"):
                if not PROGRESS_BAR.search(event["message"]):  # a library's own bar: ours is above
                    bar.console.print(f"[dim]{_e(event['message'])}[/]", highlight=False)
    job = gw.call("GET", f"/api/v1/training/status/{job_id}")
    if job["state"] == "succeeded":
        out.print(f"{_e(job_id)} succeeded: {_e(job['fineTunedModel'])}", highlight=False)
        _evaluation(job)
        if job.get("promotion"):
            out.print(_e(job["promotion"]), highlight=False)
        return 0
    reason = f": {job['error']['message']}" if job["error"] else ""
    out.print(f"{_e(job_id)} {_e(job['state'])}{_e(reason)}", highlight=False)
    return 1
