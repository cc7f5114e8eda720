"""``cyllm train``: submit, follow, inspect and cancel fine-tuning jobs."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from cyllm.cli.client import DEFAULT_URL, ApiKey, AsJson, Gateway, Url, _e, _fail, _listing, err, out
from cyllm.cli.root import app
from cyllm.training.verdict import verdict

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
