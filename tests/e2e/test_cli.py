"""The ``cyllm`` command as a user runs it: ``serve`` with a Hub id (through a local
stand-in for the Hub's file API on ``HF_ENDPOINT``) and with a local folder and flags,
and the client commands against the live stack (chat, models, files, train with a
validation file and TensorBoard, keys over HTTP, batches).  Every command is a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click
import httpx
import numpy as np
import openai
import pytest
import typer.main
import yaml

from cyllm.cli import app
from tests.conftest import free_port
from tests.e2e.conftest import DATA, create_key, secured_config, serve_command, serving
from tests.engines.conftest import default_folder
from tests.fakes.hub import Hub

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CAPITAL = "What is the capital of France?"


def cyllm(
    *args: str,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    check: bool = True,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "cyllm", *args],
        input=stdin,
        text=True,
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check:
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result


# -- the command itself ----------------------------------------------------------------------


def test_version_and_help_on_every_option():
    assert cyllm("--version").stdout.strip().startswith("cyllm ")
    root = typer.main.get_command(app)
    missing = []

    def walk(command: click.Command, path: str) -> None:
        for param in command.params:
            if param.name not in ("help",) and not getattr(param, "help", None):
                missing.append(f"{path} {param.name}")
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(root, "cyllm")
    assert not missing, missing
    shown = cyllm("train", "submit", "--help", env={"COLUMNS": "200"}).stdout
    assert "--validation-file" in shown
    for command in (["serve"], ["keys", "create"], ["certs"], ["gateway"], ["chat"]):
        shown = cyllm(*command, "--help", env={"COLUMNS": "200"}).stdout
        assert "list[" not in shown and "Optional" not in shown, (command, shown)


def test_serve_refuses_what_it_cannot_serve(tmp_path):
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    for model, says in (
        (str(not_a_model), "without config.json"),
        (str(tmp_path / "nothing-here"), "no such file or folder"),
        ("weights.bin", "neither a local folder"),
    ):
        result = cyllm("serve", model, check=False, timeout=60)
        assert result.returncode == 2 and says in result.stderr, result.stderr
    flags_alone = cyllm("serve", "--engine", "transformers", check=False, timeout=60)
    assert flags_alone.returncode == 2 and "need(s) MODEL" in flags_alone.stderr


def test_log_level_and_json_logs_reach_every_line(tmp_path):
    """One access line per request, JSON in JSON mode (uvicorn's own lines too),
    timestamps with milliseconds and zone."""
    log = tmp_path / "serve.log"
    with serving(log, env={"CYLLM_LOG_FORMAT": "json"}) as server:
        httpx.get(f"{server.base_url}/v1/models", timeout=30)
        httpx.get(f"{server.base_url}/api/v1/health/live", timeout=30)
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    assert records and all(r["ts"][23] in "+-Z" and r["ts"][19] == "." for r in records)
    assert any(r["logger"].startswith("uvicorn") for r in records)  # uvicorn's, as JSON
    gateway_lines = [line for line in log.read_text().splitlines() if "/v1/models" in line]
    assert (
        len([r for r in records if r["logger"] == "cyllm.gateway.access" and "/v1/models" in json.dumps(r)])
        == 1
    ), gateway_lines
    assert not any("uvicorn.access" == r["logger"] for r in records)


# -- serve <Hub id> --------------------------------------------------------------------------


def test_serve_a_hub_id_downloads_once_and_chats(tmp_path):
    with Hub({HUB_ID: default_folder()}, free_port()) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
        with serving(
            tmp_path / "serve.log",
            args=[HUB_ID, "--engine", "transformers", "--max-context", "1024"],
            env=env,
        ) as server:
            assert "model.safetensors" in hub.downloads and "config.json" in hub.downloads
            assert not any(f.endswith((".bin", ".pt", ".py")) for f in hub.downloads)
            listed = json.loads(cyllm("models", "list", "--json", "--url", server.base_url).stdout)
            assert [(m["id"], m["engine"], m["contextLength"]) for m in listed] == [
                (HUB_ID, "transformers", 1024)
            ]
            chat = cyllm(
                "chat",
                "--url",
                server.base_url,
                "--temperature",
                "0",
                "--max-tokens",
                "20",
                stdin=f"{CAPITAL}\n/reset\nAnd of Italy?\n/exit\nnever sent\n",
            )
            answers = chat.stdout.strip().splitlines()
            assert len(answers) == 2 and "Paris" in answers[0], chat.stdout
            assert "never sent" not in chat.stdout
            assert "tokens/s" in chat.stderr and "conversation reset" in chat.stderr
        fetched = len(hub.downloads)
        with serving(tmp_path / "again.log", args=[HUB_ID, "--engine", "transformers"], env=env):
            assert len(hub.downloads) == fetched  # the Hub cache: nothing downloaded again
    missing = cyllm("serve", "nobody/nothing", env={**env, "HF_HUB_OFFLINE": "0"}, check=False, timeout=120)
    assert missing.returncode == 2 and "could not download nobody/nothing" in missing.stderr


# -- serve <folder> and the client commands ---------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    config = secured_config(tmp)
    admin_key = create_key(config, "ops", admin=True)
    with serving(
        tmp / "serve.log",
        config,
        args=[
            str(default_folder()),
            "--served-model-name",
            "smol",
            "--engine",
            "transformers",
            "--max-batch-size",
            "8",
        ],
    ) as s:
        s.env = {"CYLLM_URL": s.base_url, "CYLLM_API_KEY": admin_key}
        s.log = tmp / "serve.log"
        s.jobs = tmp / "jobs"
        yield s


def test_a_local_folder_is_served_under_its_name_with_the_flags(stack):
    deadline = time.monotonic() + 15  # serve looks once a second: it may follow the health check
    while not (said := [x for x in stack.log.read_text().splitlines() if "cyllm serve: ready on" in x]):
        assert time.monotonic() < deadline, "no ready line"
        time.sleep(0.2)
    assert said == [
        f"cyllm serve: ready on {stack.base_url} (OpenAI API {stack.base_url}/v1, "
        f"console {stack.base_url}/console), serving smol"
    ], said
    # The worker's and its engine's start-up went to its log file, named at the start;
    # serve's own output has the gateway's lines and no health probes.
    lines = stack.log.read_text().splitlines()
    (starting,) = [x for x in lines if x.startswith("cyllm serve: starting")]
    worker_log = Path(starting.rsplit(" go to ", 1)[1])
    assert "cyllm.worker" in worker_log.read_text()
    assert not any("cyllm.worker" in x for x in lines), lines
    assert not any("/api/v1/health" in x for x in lines), lines
    models = json.loads(cyllm("models", "list", "--json", env=stack.env).stdout)
    assert [(m["id"], m["engine"], m["state"]) for m in models] == [("smol", "transformers", "loaded")]
    table = cyllm("models", "list", env={**stack.env, "COLUMNS": "200"}).stdout
    assert "smol" in table and "transformers" in table
    no_key = cyllm("models", "list", env={"CYLLM_URL": stack.base_url, "CYLLM_API_KEY": ""}, check=False)
    assert no_key.returncode == 1 and "401" in no_key.stderr and "--api-key" in no_key.stderr
    nobody = cyllm("models", "list", "--url", f"http://127.0.0.1:{free_port()}", check=False)
    assert nobody.returncode == 1 and "cyllm serve" in nobody.stderr and "CYLLM_URL" in nobody.stderr


def test_models_unload_and_load(stack):
    assert "unloaded smol" in cyllm("models", "unload", "smol", env=stack.env).stdout
    states = {
        m["id"]: m["state"] for m in json.loads(cyllm("models", "list", "--json", env=stack.env).stdout)
    }
    assert states == {"smol": "available"}
    assert "loaded smol on" in cyllm("models", "load", "smol", env=stack.env).stdout
    bad = cyllm("models", "load", "nope", env=stack.env, check=False)
    assert bad.returncode == 1 and "nope" in bad.stderr


def test_files_upload_list_delete(stack, tmp_path):
    file_id = cyllm("files", "upload", str(DATA / "facts.jsonl"), env=stack.env).stdout.strip()
    assert file_id.startswith("file-")
    assert "facts.jsonl" in cyllm("files", "show", file_id, env=stack.env).stdout
    assert file_id in cyllm("files", "list", env={**stack.env, "COLUMNS": "60"}).stdout
    listed = json.loads(cyllm("files", "list", "--json", env=stack.env).stdout)
    assert file_id in [f["id"] for f in listed]
    assert f"deleted {file_id}" in cyllm("files", "delete", file_id, env=stack.env).stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user"}]}\n')
    refused = cyllm("files", "upload", str(bad), env=stack.env, check=False)
    assert refused.returncode == 1 and "line 1" in refused.stderr  # the server's message


def test_train_submit_watch_status_with_validation_and_tensorboard(stack):
    submitted = cyllm(
        "train",
        "submit",
        "--model",
        "smol",
        "--file",
        str(DATA / "facts.jsonl"),
        "--validation-file",
        str(DATA / "facts_held_out.jsonl"),
        "--max-steps",
        "6",
        "--batch-size",
        "4",
        "--learning-rate",
        "0.002",
        "--report-to",
        "tensorboard",
        "--promote-to",
        "smol-bot",
        "--watch",
        env={**stack.env, "COLUMNS": "160"},
    )
    job_id = submitted.stdout.strip().splitlines()[0]
    assert job_id.startswith("ftjob-")
    assert f"{job_id} succeeded: smol:ft-" in submitted.stdout
    assert "promoted to smol-bot" in submitted.stdout  # a new alias: nothing to beat
    assert "6/6" in submitted.stderr and "loss" in submitted.stderr  # the progress bar's end
    status = json.loads(cyllm("train", "status", job_id, "--json", env=stack.env).stdout)
    assert status["state"] == "succeeded" and status["progress"]["evalLoss"] > 0
    assert status["evaluation"]["result.eval_loss"] > 0
    stack.tuned = status["fineTunedModel"]
    assert "eval" in submitted.stderr and "result.eval_loss" in submitted.stdout  # eval loss, evaluation
    narrow = cyllm("train", "list", env={**stack.env, "COLUMNS": "70"}).stdout
    assert job_id in narrow  # an id is never cut, however narrow the terminal
    logs = cyllm("train", "logs", job_id, env=stack.env).stdout
    assert logs.index("running on worker") < logs.index("training finished; serving it as smol:ft-")
    # TensorBoard's event files, with the training loss in them
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = list((stack.jobs / job_id / "tensorboard").rglob("events.out.tfevents.*"))
    assert runs, list((stack.jobs / job_id).iterdir())
    scalars = EventAccumulator(str(runs[0].parent)).Reload().Tags()["scalars"]
    assert "train/loss" in scalars and "eval/loss" in scalars, scalars
    assert (stack.jobs / job_id / "loss.png").is_file()


def test_models_and_aliases_commands(stack, tmp_path):
    tuned = stack.tuned  # the previous test's result
    shown = cyllm("models", "show", tuned, env={**stack.env, "COLUMNS": "200"}).stdout
    assert "kind: adapter" in shown and "aliases: ['smol-bot']" in shown and "evaluation:" in shown
    listed = json.loads(cyllm("aliases", "list", "--json", env=stack.env).stdout)
    assert listed == [{"name": "smol-bot", "model": tuned, "moves": None}]
    assert (
        "smol-bot -> smol"
        in cyllm("aliases", "set", "smol-bot", "smol", "--reason", "compare", env=stack.env).stdout
    )
    history = json.loads(cyllm("aliases", "show", "smol-bot", "--json", env=stack.env).stdout)["moves"]
    assert [(m["fromModel"], m["toModel"], m["reason"]) for m in history][-1] == (tuned, "smol", "compare")
    assert f"smol-bot -> {tuned}" in cyllm("aliases", "rollback", "smol-bot", env=stack.env).stdout
    archive = tmp_path / "tuned.tar"
    assert "wrote" in cyllm("models", "export", tuned, "-o", str(archive), env=stack.env).stdout
    import tarfile

    names = tarfile.open(archive).getnames()
    assert any(n.endswith("/adapter_config.json") for n in names), names
    assert "published to *" in cyllm("models", "publish", tuned, "--everyone", env=stack.env).stdout
    assert f"deleted {tuned}" in cyllm("models", "delete", tuned, env=stack.env).stdout
    gone = cyllm("models", "show", tuned, env=stack.env, check=False)
    assert gone.returncode == 1 and "404" in gone.stderr
    assert cyllm("aliases", "show", "smol-bot", env=stack.env, check=False).returncode == 1


def test_train_cancel(stack):
    job_id = cyllm(
        "train",
        "submit",
        "--model",
        "smol",
        "--dataset",
        str(DATA / "facts.jsonl"),
        "--max-steps",
        "5000",
        "--batch-size",
        "1",
        env=stack.env,
    ).stdout.strip()
    cancelled = cyllm("train", "cancel", job_id, env=stack.env).stdout
    assert job_id in cancelled
    watched = cyllm("train", "watch", job_id, env=stack.env, check=False)
    assert watched.returncode == 1 and f"{job_id} cancelled" in watched.stdout


def test_keys_over_http(stack):
    created = cyllm("keys", "create", "--name", "app", "--model", "smol", env=stack.env).stdout
    key_id, secret = created.split()[1], created.strip().splitlines()[-1]
    listed = [json.loads(line) for line in cyllm("keys", "list", env=stack.env).stdout.splitlines()]
    assert {"key_id": key_id, "name": "app", "models": ["smol"]}.items() <= next(
        k for k in listed if k["key_id"] == key_id
    ).items()
    user = {"CYLLM_URL": stack.base_url, "CYLLM_API_KEY": secret}
    assert json.loads(cyllm("models", "list", "--json", env=user).stdout)[0]["id"] == "smol"
    refused = cyllm("keys", "list", env=user, check=False)
    assert refused.returncode == 1 and "403" in refused.stderr
    assert f"revoked {key_id}" in cyllm("keys", "revoke", key_id, env=stack.env).stdout
    gone = cyllm("models", "list", env=user, check=False)
    assert gone.returncode == 1 and "401" in gone.stderr


def test_batch_submit_wait_download_and_the_official_client(stack, tmp_path):
    """``cyllm batch`` runs a file of chat requests on the real model; the official
    openai client runs a batch of embeddings and reads both, as its docs show."""
    rows = [
        {
            "custom_id": f"q{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "smol",
                "messages": [{"role": "user", "content": q}],
                "max_tokens": 12,
                "temperature": 0,
            },
        }
        for i, q in enumerate([CAPITAL, "Name a colour."])
    ]
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    submitted = cyllm("batch", "submit", str(path), "--wait", env=stack.env)
    batch_id = submitted.stdout.split()[0]
    assert batch_id.startswith("batch_") and "completed: 2 done, 0 failed of 2" in submitted.stdout
    cyllm("batch", "download", batch_id, "-o", str(tmp_path / "out.jsonl"), env=stack.env)
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["custom_id"] for o in out] == ["q0", "q1"]
    assert "Paris" in out[0]["response"]["body"]["choices"][0]["message"]["content"]
    listed = json.loads(cyllm("batch", "list", "--json", env=stack.env).stdout)
    assert batch_id in [b["id"] for b in listed]
    none = cyllm("batch", "download", batch_id, "--errors", env=stack.env, check=False)
    assert none.returncode == 1 and "has no error file" in none.stderr

    # retries as the client does by default: polling meets the control routes' rate limit
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.env["CYLLM_API_KEY"], max_retries=3)
    lines = [
        {
            "custom_id": f"e{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "smol", "input": t},
        }
        for i, t in enumerate(["a cat", "a dog", "the stock market"])
    ]
    upload = client.files.create(
        file=("emb.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode()), purpose="batch"
    )
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h")
    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "failed", "expired", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 3, batch
    assert batch.id in [b.id for b in client.batches.list()]
    vectors = [
        json.loads(x)["response"]["body"]["data"][0]["embedding"]
        for x in client.files.content(batch.output_file_id).text.splitlines()
    ]
    cat, dog, market = (np.array(v) for v in vectors)
    assert cat @ dog > cat @ market  # normalised: the cosine


def test_chat_edits_recalls_and_stops_in_a_terminal(stack):
    """``cyllm chat`` in a pseudo-terminal, keys as a user presses them: the up arrow
    recalls the last message, Ctrl-C stops an answer and the chat goes on, a refused
    message keeps the conversation."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # the child: the command, its terminal the pty
        os.environ.update({**stack.env, "COLUMNS": "120", "TERM": "xterm"})
        os.execv(sys.executable, [sys.executable, "-m", "cyllm", "chat", "smol", "--temperature", "0"])
    seen = b""

    def until(*wanted: bytes, timeout: float = 120) -> bytes:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while not all(w in seen for w in wanted):
            left = deadline - time.monotonic()
            assert left > 0, (wanted, seen[-2000:])
            if select.select([fd], [], [], left)[0]:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    break
        return seen

    try:
        until(b"> ")
        seen = b""
        os.write(fd, b"What is the capital of France?\r")
        until(b"tokens, first after", b"> ")
        seen = b""
        os.write(fd, b"\x1b[A")  # up: the last message again, editable
        until(b"What is the capital of France?")
        os.write(fd, b"\x15Write a very long story about a dragon.\r")  # Ctrl-U clears it first
        until(b"\n", timeout=60)
        time.sleep(1.0)  # mid-answer
        os.write(fd, b"\x03")
        until(b"(stopped)", b"> ")
        seen = b""
        os.write(fd, b"/reset\r")
        until(b"conversation reset")
        os.write(fd, b"/exit\r")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
    refused = cyllm("chat", "no-such-model", stdin="hi\nhello\n/exit\n", env=stack.env, check=False)
    assert refused.returncode == 1 and refused.stderr.count("no-such-model") == 2, refused.stderr


def test_serve_says_once_why_its_worker_failed(tmp_path):
    """A worker that cannot start: its own words (the error, from the worker's log) are
    printed with its exit, once, not at every restart."""
    config = tmp_path / "cyllm.yaml"
    config.write_text(
        yaml.safe_dump(
            {"models": [{"id": "broken", "engine": "transformers", "path": str(tmp_path / "gone")}]}
        )
    )
    cmd, *_ = serve_command(config)
    env = {**os.environ, "CYLLM_COORDINATOR_STATE_DB": str(tmp_path / "state.db"), "COLUMNS": "120"}
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while sum("worker exited with code" in x for x in seen) < 2:  # a first exit, then a second
            assert time.monotonic() < deadline and proc.poll() is None, "\n".join(seen[-40:])
            seen.append(proc.stdout.readline().rstrip("\n"))
    finally:
        proc.terminate()
        proc.wait(30)
    text = "\n".join(seen)
    log = tmp_path / "logs" / "worker.log"
    assert seen[0] == f"cyllm serve: starting; the worker's and its engine's output go to {log}"
    assert text.count(f"cyllm serve: worker exited; from {log}") == 1, text
    assert str(tmp_path / "gone") in text  # the cause, in the worker's words
    assert log.stat().st_mode & 0o077 == 0  # this user's alone
