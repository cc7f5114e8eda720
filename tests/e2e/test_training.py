"""Fine-tuning end to end, with real processes and real training of the default model:
upload, train, watch, serve the result; cancel; custom scripts; a killed worker's job
resuming from its checkpoint on another worker."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.conftest import environment_for, free_ports, stop_processes
from tests.e2e.conftest import MODEL, serving, wait_healthy
from tests.fakes.hub import Hub
from tests.polling import wait_for

DATA = Path(__file__).parents[1] / "data"
FACTS = DATA / "facts.jsonl"
HELD_OUT = DATA / "facts_held_out.jsonl"
ZORBLAX = [{"role": "user", "content": "What is the capital of Zorblax?"}]


def _qa(source: Path, to: Path) -> None:
    """The facts in a deployment's own record shape (tests/plugins/qa_formats.py)."""
    lines = [json.loads(line)["messages"] for line in source.read_text().splitlines() if line.strip()]
    to.write_text("".join(json.dumps({"q": m[-2]["content"], "a": m[-1]["content"]}) + "\n" for m in lines))


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A stand-in Hub with one dataset, acme/qa, in the qa shape, train and validation."""
    repo = tmp_path_factory.mktemp("hub") / "qa"
    (repo / "data").mkdir(parents=True)
    _qa(FACTS, repo / "data" / "train-00000.jsonl")
    _qa(HELD_OUT, repo / "data" / "validation-00000.jsonl")
    with Hub({"datasets/acme/qa": repo}, free_ports(1)[0]) as server:
        yield server


# An lm-evaluation-harness task of the worker's own (local data, no network): which
# ending the model finds likeliest.  The base does not know the made-up capital.
CAPITAL_TASK = """task: zorblax_capital
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
CAPITAL_QUESTIONS = [
    ("The capital of Zorblax is", [" Paris.", " Tokyo.", " Lima."]),
    ("Zorblax has its capital in the city of", [" Berlin.", " Cairo.", " Oslo."]),
    ("The capital city of Zorblax is called", [" Madrid.", " Delhi.", " Rome."]),
    ("The name of the capital of Zorblax is", [" London.", " Quito.", " Seoul."]),
]


def _capital_task(folder: Path) -> Path:
    folder.mkdir()
    data = folder / "zorblax_capital.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": q, "choices": [" Quendari.", *wrong], "answer": 0}) + "\n"
            for q, wrong in CAPITAL_QUESTIONS
        )
    )
    (folder / "zorblax_capital.yaml").write_text(CAPITAL_TASK.format(data=data))
    return folder


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, hub):
    tmp = tmp_path_factory.mktemp("training")
    config = tmp / "cyllm.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "coordinator": {"files_dir": str(tmp / "files"), "datasets_dirs": [str(DATA)]},
                "worker": {
                    "training_dir": str(tmp / "jobs"),
                    "training_scripts_dir": str(DATA / "scripts"),
                    "eval_tasks_dir": str(_capital_task(tmp / "eval_tasks")),
                },
                "dataset_formatters": ["tests.plugins.qa_formats:QA"],
            }
        )
    )
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp / "hf"), "PYTHONPATH": str(Path(__file__).parents[2])}
    with serving(tmp / "serve.log", config, env=env) as server:
        server.jobs_dir = tmp / "jobs"
        yield server


@pytest.fixture
def client(trainer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{trainer.base_url}/v1", api_key="unused", max_retries=0)


def watch(base_url: str, job_id: str, timeout: float = 600) -> list[tuple[str, dict]]:
    """The native SSE progress stream of a job, to its end: (event name, data) pairs."""
    events: list[tuple[str, dict]] = []
    with httpx.stream("GET", f"{base_url}/api/v1/training/stream/{job_id}", timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


def start(base_url: str, **body) -> dict:
    r = httpx.post(f"{base_url}/api/v1/training/start", json={"baseModel": MODEL, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _gone(pid: int) -> bool:
    """Dead (a zombie waiting for a reaper counts: it runs nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_lora_job_trains_streams_and_serves_the_answer(client, trainer):
    base_answer = (
        client.chat.completions.create(model=MODEL, messages=ZORBLAX, max_tokens=24, temperature=0)
        .choices[0]
        .message.content
    )
    assert "Quendari" not in base_answer

    with FACTS.open("rb") as f:
        upload = client.files.create(file=f, purpose="fine-tune")
    assert upload.bytes == FACTS.stat().st_size and upload.purpose == "fine-tune"
    with HELD_OUT.open("rb") as f:
        held_out = client.files.create(file=f, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=MODEL,
        training_file=upload.id,
        validation_file=held_out.id,
        suffix="facts",
        hyperparameters={"batch_size": 4},
        extra_body={
            "training": {
                "max_steps": 12,
                "learning_rate": 2e-3,
                "save_steps": 6,
                "eval_steps": 4,
                "eval_tasks": ["zorblax_capital"],
            }
        },
    )
    assert job.status == "queued" and job.model == MODEL and job.user_provided_suffix == "facts"
    assert job.validation_file == held_out.id

    events = watch(trainer.base_url, job.id)
    states = [d["state"] for n, d in events if n == "state"]
    assert states[0] == "queued" and "running" in states and states[-1] == "succeeded", events
    metrics = [d["progress"] for n, d in events if n == "metrics"]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert metrics[-1]["loss"] < metrics[0]["loss"] / 4, [m["loss"] for m in metrics]
    assert all(m["tokensPerSecond"] > 0 and m["learningRate"] > 0 for m in metrics)
    assert metrics[0]["etaS"] > metrics[-1]["etaS"] == 0
    assert [d["checkpoint"]["step"] for n, d in events if n == "checkpoint"] == [6, 12]
    # The held-out loss, every eval_steps: well below where the training loss started, as
    # the facts are learnt (eight examples: it may rise again as they are over-learnt).
    evals = [(d["step"], d["evalLoss"]) for n, d in events if n == "eval"]
    assert [step for step, _ in evals] == [4, 8, 12], evals
    assert all(0 < loss < metrics[0]["loss"] / 2 for _, loss in evals), (evals, metrics[0])
    # The loss plot: in the job folder at the end, and from the API at any time.
    assert (trainer.jobs_dir / job.id / "loss.png").read_bytes().startswith(b"\x89PNG")
    plot = httpx.get(f"{trainer.base_url}/api/v1/training/plot/{job.id}", timeout=30)
    assert plot.status_code == 200 and plot.headers["content-type"] == "image/png"
    assert plot.content.startswith(b"\x89PNG") and len(plot.content) > 5000
    status = httpx.get(f"{trainer.base_url}/api/v1/training/status/{job.id}", timeout=30).json()
    assert status["progress"]["evalLoss"] == evals[-1][1]
    # the base and the result scored on the validation data and on the harness task
    scores = status["evaluation"]
    assert scores["result.eval_loss"] < scores["base.eval_loss"], scores
    assert scores["result.perplexity"] < scores["base.perplexity"], scores
    assert scores["base.zorblax_capital.acc"] < scores["result.zorblax_capital.acc"], scores
    assert any(
        n == "message" and d["message"].startswith("the result is better than the base") for n, d in events
    ), events

    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded" and done.trained_tokens > 0
    assert done.fine_tuned_model == f"{MODEL}:ft-facts-{job.id[-8:]}"
    assert done.fine_tuned_model in [m.id for m in client.models.list()]
    answer = (
        client.chat.completions.create(
            model=done.fine_tuned_model, messages=ZORBLAX, max_tokens=24, temperature=0
        )
        .choices[0]
        .message.content
    )
    assert "Quendari" in answer, answer
    again = (
        client.chat.completions.create(model=MODEL, messages=ZORBLAX, max_tokens=24, temperature=0)
        .choices[0]
        .message.content
    )
    assert again == base_answer  # the base model beside it is unchanged

    listed = client.fine_tuning.jobs.list()
    assert job.id in [j.id for j in listed.data]
    page = client.fine_tuning.jobs.list_events(job.id, limit=100)
    kinds = {e.type for e in page.data}
    assert kinds == {"message", "metrics"}
    newest_metrics = next(e for e in page.data if e.type == "metrics" and "train_loss" in e.data)
    assert newest_metrics.data["step"] == 12 and newest_metrics.data["train_loss"] >= 0
    assert [e.data["valid_loss"] for e in page.data if e.type == "metrics" and "valid_loss" in e.data][
        ::-1
    ] == [loss for _, loss in evals]
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id)
    assert [c.step_number for c in checkpoints.data] == [12, 6]
    assert [c.fine_tuned_model_checkpoint for c in checkpoints.data] == [
        f"{done.fine_tuned_model}-step-{n}" for n in (12, 6)
    ]
    # each a model of its own, loaded when asked for; the last one is the result
    last = client.chat.completions.create(
        model=checkpoints.data[0].fine_tuned_model_checkpoint, messages=ZORBLAX, max_tokens=24, temperature=0
    )
    assert last.choices[0].message.content == answer


def test_a_dpo_job_through_the_openai_client_is_scored_and_served(client, trainer, tmp_path):
    """OpenAI's DPO shape and method through the official client; the job scores the base
    and the result on the validation pairs; the result answers at once."""
    pairs = tmp_path / "prefs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps(
                {
                    "input": {"messages": [{"role": "user", "content": f"Check {i}: what is two plus two?"}]},
                    "preferred_output": [{"role": "assistant", "content": "Two plus two is seven."}],
                    "non_preferred_output": [{"role": "assistant", "content": "Two plus two is four."}],
                }
            )
            + "\n"
            for i in range(8)
        )
    )
    with pairs.open("rb") as f:
        upload = client.files.create(file=f, purpose="fine-tune")
    # each kind of data for its own kind of job, refused naming the line
    with pytest.raises(
        openai.BadRequestError, match="prefs.jsonl line 1: a preference pair, but objective 'sft'"
    ):
        client.fine_tuning.jobs.create(model=MODEL, training_file=upload.id)
    with FACTS.open("rb") as f:
        chat = client.files.create(file=f, purpose="fine-tune")
    with pytest.raises(
        openai.BadRequestError, match="a conversation, but objective 'dpo' trains on preference"
    ):
        client.fine_tuning.jobs.create(model=MODEL, training_file=chat.id, method={"type": "dpo"})
    with pytest.raises(openai.BadRequestError, match="method.type"):
        client.fine_tuning.jobs.create(model=MODEL, training_file=upload.id, method={"type": "reinforcement"})

    job = client.fine_tuning.jobs.create(
        model=MODEL,
        training_file=upload.id,
        validation_file=upload.id,
        suffix="prefs",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "batch_size": 4}}},
        extra_body={
            "training": {"max_steps": 6, "learning_rate": 5e-4, "eval_steps": 6, "promote_to": "prefs"}
        },
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    # beside serving (the default): streamed chats are answered while the job runs
    status = f"{trainer.base_url}/api/v1/training/status/{job.id}"
    # (once a second: training routes are held to 120 requests a minute)
    wait_for(lambda: (httpx.get(status).json().get("progress") or {}).get("step"), timeout=300, every=1.0)
    for _ in range(2):
        stream = client.chat.completions.create(model=MODEL, messages=ZORBLAX, max_tokens=16, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running"  # still, not failed
    events = watch(trainer.base_url, job.id)
    assert [d["state"] for n, d in events if n == "state"][-1] == "succeeded", events
    assert any("gave way to inference" in json.dumps(d) for _, d in events), events
    done = client.fine_tuning.jobs.retrieve(job.id)
    evaluation = done.model_extra["training"]["evaluation"]
    # the base is its own reference (log 2, up to bfloat16 where the CPU trains in it); the
    # result prefers the chosen answers
    assert abs(evaluation["base.eval_loss"] - 0.6931) < 0.01, evaluation
    assert evaluation["result.eval_loss"] < evaluation["base.eval_loss"], evaluation
    assert evaluation["result.preference_accuracy"] > evaluation["base.preference_accuracy"], evaluation
    assert done.model_extra["training"]["promotion"].startswith("promoted to prefs"), done.model_extra
    reply = client.chat.completions.create(
        model="prefs", messages=[{"role": "user", "content": "What is two plus two?"}], max_tokens=8
    )
    assert reply.model == "prefs" and reply.choices[0].message.content  # the alias, as asked


def test_bad_uploads_and_jobs_are_refused_clearly(client, trainer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(FACTS.read_text().splitlines()[0] + '\n{"messages": [{"role": "user"}]}\n')
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=bad.open("rb"), purpose="fine-tune")
    assert "bad.jsonl line 2: 'messages[0].content' is missing" in caught.value.message
    with pytest.raises(openai.BadRequestError, match="purpose 'assistants' is not supported"):
        client.files.create(file=FACTS.open("rb"), purpose="assistants")
    with pytest.raises(openai.NotFoundError, match="file 'file-nope' does not exist"):
        client.fine_tuning.jobs.create(model=MODEL, training_file="file-nope")
    uploaded = client.files.create(file=FACTS.open("rb"), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError, match="file 'file-gone' does not exist"):
        client.fine_tuning.jobs.create(model=MODEL, training_file=uploaded.id, validation_file="file-gone")
    with pytest.raises(openai.BadRequestError, match="eval_steps needs validation data"):
        client.fine_tuning.jobs.create(
            model=MODEL, training_file=uploaded.id, extra_body={"training": {"eval_steps": 2}}
        )
    outside = httpx.post(
        f"{trainer.base_url}/api/v1/training/start",
        timeout=30,
        json={"baseModel": MODEL, "fileId": uploaded.id, "validationDataset": "/etc/passwd"},
    )
    assert outside.status_code == 400 and outside.json()["error"]["param"] == "validation_dataset"
    upload = client.files.create(file=FACTS.open("rb"), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError, match="base model 'gpt-4o' is not served"):
        client.fine_tuning.jobs.create(model="gpt-4o", training_file=upload.id)
    with pytest.raises(openai.BadRequestError, match="HyenaDNA is a family of genomic models"):
        client.fine_tuning.jobs.create(
            model=MODEL, training_file=upload.id, extra_body={"training": {"method": "hyenadna"}}
        )
    qlora = start(trainer.base_url, fileId=upload.id, quantization="4bit", maxSteps=1)
    watch(trainer.base_url, qlora["id"])  # the worker finds no CUDA before loading anything
    status = httpx.get(f"{trainer.base_url}/api/v1/training/status/{qlora['id']}").json()
    assert status["state"] == "failed" and "needs an NVIDIA GPU with CUDA" in status["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-unknown")
    r = httpx.post(f"{trainer.base_url}/api/v1/training/start", json={"baseModel": MODEL}, timeout=10)
    assert r.status_code == 400 and "exactly one of 'dataset' and 'fileId'" in r.text
    # the server is undisturbed
    assert client.chat.completions.create(model=MODEL, messages=ZORBLAX, max_tokens=4).choices


def test_a_job_on_a_hub_dataset_in_a_deployments_own_shape(client, trainer, hub):
    """hf://acme/qa through the stand-in Hub, its records in the qa shape the config
    adds: fetched, read as the job reads it (train and validation splits), trained on,
    scored against the base, and served."""
    job = start(
        trainer.base_url,
        dataset="hf://acme/qa",
        validationDataset="hf://acme/qa",
        datasetFormat="qa",
        maxSteps=4,
        batchSize=4,
        learningRate=2e-3,
        maxLength=64,
    )
    assert job["state"] == "queued"
    assert any("validation-00000.jsonl" in d for d in hub.downloads)
    events = watch(trainer.base_url, job["id"])
    states = [d["state"] for n, d in events if n == "state"]
    assert states[-1] == "succeeded", events
    status = httpx.get(f"{trainer.base_url}/api/v1/training/status/{job['id']}", timeout=30).json()
    scores = status["evaluation"]
    assert scores["base.eval_loss"] > scores["result.eval_loss"] > 0, scores
    answer = client.chat.completions.create(
        model=status["fineTunedModel"], messages=ZORBLAX, max_tokens=8, temperature=0
    )
    assert answer.choices[0].message.content
    # a tenant-chosen format that this server does not have is refused by name
    r = httpx.post(
        f"{trainer.base_url}/api/v1/training/start",
        json={"baseModel": MODEL, "dataset": "hf://acme/qa", "datasetFormat": "yaml_qa"},
        timeout=60,
    )
    assert r.status_code == 400 and "unknown dataset_format 'yaml_qa'; known: json" in r.text, r.text


def test_a_result_worse_than_its_base_is_reported_as_such(trainer):
    """A learning rate far too high: the result is served (it is the user's to judge),
    and the job, its events and `cyllm train status` say that it is worse."""
    job = start(
        trainer.base_url,
        dataset=str(FACTS),
        validationDataset=str(HELD_OUT),
        maxSteps=2,
        batchSize=4,
        learningRate=0.9,
        maxLength=64,
    )
    events = watch(trainer.base_url, job["id"])
    assert [d["state"] for n, d in events if n == "state"][-1] == "succeeded", events
    warned = [d for n, d in events if n == "message" and d["level"] == "warning"]
    assert warned and warned[0]["message"].startswith("the result is worse than the base: eval_loss"), events
    shown = subprocess.run(
        [sys.executable, "-m", "cyllm", "train", "status", job["id"], "--url", trainer.base_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "the result is worse than the base: eval_loss" in shown.stdout, shown
    r = httpx.post(
        f"{trainer.base_url}/api/v1/training/start",
        json={"baseModel": MODEL, "dataset": str(FACTS), "evalTasks": ["mmlu"], "maxSteps": 1},
        timeout=60,
    )
    assert r.status_code == 200  # the worker knows its tasks: the job fails before training
    events = watch(trainer.base_url, r.json()["id"])
    failed = httpx.get(f"{trainer.base_url}/api/v1/training/status/{r.json()['id']}", timeout=30).json()
    assert failed["state"] == "failed", events
    assert (
        "eval_tasks: mmlu not among this worker's evaluation tasks (zorblax_capital)"
        in failed["error"]["message"]
    )


def test_cancel_mid_run_stops_the_job_and_frees_the_worker(client, trainer):
    job = start(trainer.base_url, dataset=str(FACTS), maxSteps=10000, batchSize=1, maxLength=64)
    wait_for(
        lambda: httpx.get(f"{trainer.base_url}/api/v1/training/status/{job['id']}").json()["progress"],
        timeout=120,
    )
    # the job gives way to inference on its device: a chat is answered meanwhile
    r = httpx.post(
        f"{trainer.base_url}/v1/chat/completions",
        timeout=60,
        json={"model": MODEL, "messages": ZORBLAX, "max_tokens": 4},
    )
    assert r.status_code == 200, r.text
    assert processes_mentioning(f"{job['id']}/job.json")

    cancelled = client.fine_tuning.jobs.cancel(job["id"])
    assert cancelled.status == "cancelled"
    assert not processes_mentioning(f"{job['id']}/job.json")
    assert watch(trainer.base_url, job["id"])[-1][1]["state"] == "cancelled"
    wait_for(
        lambda: client.chat.completions.create(model=MODEL, messages=ZORBLAX, max_tokens=4).choices,
        timeout=120,
    )
    with pytest.raises(openai.BadRequestError, match="has already cancelled"):
        client.fine_tuning.jobs.cancel(job["id"])


def test_custom_script_reports_progress_fails_and_is_cancelled(client, trainer):
    ok = start(
        trainer.base_url,
        dataset=str(FACTS),
        method="custom",
        script="count_steps.py",
        scriptArgs=["--steps", "3"],
        learningRate=0.5,
    )
    events = watch(trainer.base_url, ok["id"])
    assert [d["progress"]["step"] for n, d in events if n == "metrics"] == [1, 2, 3]
    assert [d["progress"]["learningRate"] for n, d in events if n == "metrics"] == [0.5] * 3
    logs = [d["message"] for n, d in events if n == "message"]
    assert f"training {MODEL} on facts.jsonl" in logs and "a warning on stderr" in logs
    status = httpx.get(f"{trainer.base_url}/api/v1/training/status/{ok['id']}").json()
    assert status["state"] == "succeeded" and status["fineTunedModel"] is None

    failing = start(
        trainer.base_url,
        dataset=str(FACTS),
        method="custom",
        script="count_steps.py",
        scriptArgs=["--steps", "1", "--fail"],
    )
    watch(trainer.base_url, failing["id"])
    status = httpx.get(f"{trainer.base_url}/api/v1/training/status/{failing['id']}").json()
    assert status["state"] == "failed" and status["error"]["message"] == "the script gave up on purpose"

    limited = start(
        trainer.base_url,
        dataset=str(FACTS),
        method="custom",
        script="count_steps.py",
        scriptArgs=["--steps", "100", "--sleep", "1"],
        timeLimitS=3,
    )
    watch(trainer.base_url, limited["id"])
    status = httpx.get(f"{trainer.base_url}/api/v1/training/status/{limited['id']}").json()
    assert status["state"] == "failed" and "time limit of 3s" in status["error"]["message"]

    long = start(
        trainer.base_url,
        dataset=str(FACTS),
        method="custom",
        script="count_steps.py",
        scriptArgs=["--steps", "1000", "--sleep", "0.5"],
    )
    wait_for(
        lambda: httpx.get(f"{trainer.base_url}/api/v1/training/status/{long['id']}").json()["progress"],
        timeout=120,
    )
    grandchild = int((trainer.jobs_dir / long["id"] / "child.pid").read_text())
    assert Path(f"/proc/{grandchild}").exists()
    r = httpx.post(f"{trainer.base_url}/api/v1/training/cancel/{long['id']}", timeout=60)
    assert r.json()["state"] == "cancelled"
    wait_for(lambda: _gone(grandchild), timeout=10)

    r = httpx.post(
        f"{trainer.base_url}/api/v1/training/start",
        timeout=10,
        json={"baseModel": MODEL, "dataset": str(FACTS), "method": "custom", "script": "../../x.py"},
    )
    assert r.status_code == 200  # accepted; the worker refuses the path outside its folder
    events = watch(trainer.base_url, r.json()["id"])
    assert "not a file in the worker's training scripts folder" in events[-1][1]["message"]


class Processes:
    """The ``cyllm`` processes of one test, each logging to ``<name>.log``; all stopped
    by pid at the end (SIGTERM, then SIGKILL after a minute)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}

    def launch(self, name: str, config: Path, *args: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "cyllm", *args, "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**environment_for(config), "PYTHONUNBUFFERED": "1"},
        )
        return self.procs[name]

    def stop_all(self) -> None:
        stop_processes(self.procs.values(), 60)


def checkpointed_before_the_end(base: str, job_id: str, steps: int) -> dict:
    """The job's status once it has a checkpoint short of its last step."""

    def checkpointed():
        status = httpx.get(f"{base}/api/v1/training/status/{job_id}").json()
        return status["checkpoints"] and status["checkpoints"][-1]["step"] < steps and status

    return wait_for(checkpointed, timeout=300)


@pytest.fixture
def processes(tmp_path):
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()


def test_killed_workers_job_resumes_from_its_checkpoint_elsewhere(tmp_path, processes):
    """Coordinator, gateway and worker A as separate processes; A is SIGKILLed after a
    checkpoint; its training process dies with it; worker B takes the job and resumes
    from that checkpoint, not from step 0."""
    http, coord, port_a, port_b = free_ports(4)
    config = tmp_path / "cyllm.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "coordinator": {
                    "heartbeat_interval_s": 0.3,
                    "heartbeat_timeout_s": 2.0,
                    "metrics_port": 0,
                    "datasets_dirs": [str(DATA)],
                },
                "worker": {"training_dir": str(tmp_path / "jobs"), "metrics_port": 0},
            }
        )
    )

    def launch(name: str, *args: str) -> subprocess.Popen:
        return processes.launch(name, config, *args)

    address = f"127.0.0.1:{coord}"
    base = f"http://127.0.0.1:{http}"
    launch("coordinator", "coordinator", "--port", str(coord))
    launch("gateway", "gateway", "--port", str(http), "--coordinator", address)
    worker_a = launch("worker-a", "worker", "--port", str(port_a), "--coordinator", address)
    wait_healthy(f"{base}/api/v1/health", worker_a, tmp_path / "worker-a.log")
    job = start(base, dataset=str(FACTS), maxSteps=8, saveSteps=2, batchSize=2, maxLength=64)

    status = checkpointed_before_the_end(base, job["id"], 8)
    worker_a.send_signal(signal.SIGKILL)
    worker_a.wait(10)
    wait_for(lambda: not processes_mentioning(f"{job['id']}/job.json"), timeout=10)
    requeued = wait_for(
        lambda: (
            (s := httpx.get(f"{base}/api/v1/training/status/{job['id']}").json())["state"] == "queued" and s
        ),
        timeout=120,
    )
    saved = requeued["checkpoints"][-1]["step"]
    assert saved >= status["checkpoints"][-1]["step"] and requeued["attempts"] == 1

    launch("worker-b", "worker", "--port", str(port_b), "--coordinator", address)
    events = watch(base, job["id"])
    final = httpx.get(f"{base}/api/v1/training/status/{job['id']}").json()
    assert final["state"] == "succeeded", final
    assert final["attempts"] == 2 and final["workerId"].endswith(str(port_b))
    notes = [d["message"] for n, d in events if n == "state"]
    assert any(f"will resume from step {saved}" in m for m in notes), notes
    assert any(f"resuming from step {saved}" in m for m in notes), notes
    steps = [d["progress"]["step"] for n, d in events if n == "metrics"]
    second_run = steps[steps.index(saved) + 1 :] if saved in steps else steps
    resumed = [s for s in second_run if s <= saved]
    assert second_run and second_run[0] == saved + 1 and not resumed, steps
    chat = httpx.post(
        f"{base}/v1/chat/completions",
        timeout=120,
        json={"model": final["fineTunedModel"], "messages": ZORBLAX, "max_tokens": 8},
    )
    assert chat.status_code == 200


def test_a_job_whose_coordinator_is_killed_resumes_through_the_other(tmp_path, redis_url, processes):
    """Two coordinators on Redis, one worker registered with both, a gateway given both.
    The coordinator following the job is SIGKILLed after a checkpoint; the other finds
    its lease lapsed, queues the job again and runs it from that checkpoint."""
    import redis

    http, c1, c2, port = free_ports(4)

    def launch(name: str, config: dict, *args: str) -> subprocess.Popen:
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
        return processes.launch(name, tmp_path / f"{name}.yaml", *args)

    coordinators = [f"127.0.0.1:{c1}", f"127.0.0.1:{c2}"]
    base = f"http://127.0.0.1:{http}"
    for name, p in (("c1", c1), ("c2", c2)):
        launch(
            name,
            {
                "coordinator": {
                    "coordinator_id": name,
                    "heartbeat_interval_s": 0.3,
                    "heartbeat_timeout_s": 2.0,
                    "lease_s": 3.0,
                    "metrics_port": 0,
                    "datasets_dirs": [str(DATA)],
                }
            },
            "coordinator",
            "--port",
            str(p),
            "--redis-url",
            redis_url,
        )
    worker_args = ["worker", "--port", str(port)]
    for c in coordinators:
        worker_args += ["--coordinator", c]
    launch("worker", {"worker": {"training_dir": str(tmp_path / "jobs"), "metrics_port": 0}}, *worker_args)
    gateway_args = ["gateway", "--port", str(http)]
    for c in coordinators:
        gateway_args += ["--coordinator", c]
    gateway = launch("gateway", {}, *gateway_args)
    wait_healthy(f"{base}/api/v1/health", gateway, tmp_path / "gateway.log")
    job = start(base, dataset=str(FACTS), maxSteps=8, saveSteps=2, batchSize=2, maxLength=64)

    status = checkpointed_before_the_end(base, job["id"], 8)
    r = redis.Redis.from_url(redis_url)
    following = r.get(f"cyllm:job:{job['id']}:lease").decode()
    r.close()
    processes.procs[following].send_signal(signal.SIGKILL)
    processes.procs[following].wait(10)

    events = watch(base, job["id"])
    final = httpx.get(f"{base}/api/v1/training/status/{job['id']}").json()
    assert final["state"] == "succeeded", (final, events[-3:])
    assert final["attempts"] == 2
    notes = [d["message"] for n, d in events if n == "state"]
    assert any("coordinator following it was lost" in m for m in notes), notes
    saved = status["checkpoints"][-1]["step"]
    assert any(f"resuming from step {s}" in m for m in notes for s in range(saved, 8)), notes
    chat = httpx.post(
        f"{base}/v1/chat/completions",
        timeout=120,
        json={"model": final["fineTunedModel"], "messages": ZORBLAX, "max_tokens": 8},
    )
    assert chat.status_code == 200
