"""Tenants and data on a stack with auth on (issue 12): datasets only from uploads or
``datasets_dirs`` (no file of the host read, no existence oracle, no device); bounded
reading in a memory-limited child; each tenant sees, reads, cancels and deletes only its
own files, jobs and fine-tuned models; allow-lists hold for training too; malformed input
gets a 4xx, never a 5xx."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import pytest

from cyllm import errors
from cyllm.coordinator.datasets import REFUSED
from cyllm.coordinator.registry import ModelRecord
from tests.integration.conftest import BOTH_WAYS, fake_model

pytestmark = BOTH_WAYS

FACTS = Path(__file__).parents[1] / "data" / "facts.jsonl"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def tenants(make_stack, tmp_path):
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    (datasets / "facts.jsonl").write_bytes(FACTS.read_bytes())
    (datasets / "escape.jsonl").symlink_to("/etc/passwd")
    stack = await make_stack(
        [fake_model("fake"), fake_model("other")],
        gateway={"auth_enabled": True, "api_keys_file": tmp_path / "keys.json"},
        files_dir=tmp_path / "files",
        datasets_dirs=[datasets],
        dataset_read_memory_bytes=512 << 20,
        training_max_jobs_per_tenant=2,
    )
    keys = stack.app.state.keys
    names = {}
    for name, kw in {
        "alice": {},
        "bob": {},
        "admin": {"admin": True},
        "narrow": {"models": ["other"]},
    }.items():
        meta, secret = await keys.create(name, **kw)
        names[name] = (meta.key_id, bearer(secret))
    stack.keys = names
    stack.datasets = datasets
    return stack


def h(stack, who: str) -> dict[str, str]:
    return stack.keys[who][1]


async def upload(stack, who: str, content: bytes, name: str = "d.jsonl"):
    return await stack.http.post(
        "/v1/files",
        headers=h(stack, who),
        data={"purpose": "fine-tune"},
        files={"file": (name, content, "application/octet-stream")},
    )


START = "/api/v1/training/start"


async def test_a_dataset_path_outside_the_roots_is_refused_alike_whether_or_not_it_exists(tenants):
    secrets_file = tenants.datasets.parent / ".env"
    secrets_file.write_text("prompt,response\nAPI_TOKEN,hunter2-secret\n")
    answers = []
    for path in (
        "/etc/passwd",
        str(secrets_file),
        "/no/such/file.csv",
        "/dev/zero",
        str(tenants.datasets / "escape.jsonl"),
        "../.env",
        "../../../../etc/passwd",
    ):
        for who in ("alice", "admin"):  # admins too: datasets_any_path_for_admins is off
            r = await tenants.http.post(
                START,
                headers=h(tenants, who),
                json={"baseModel": "fake", "dataset": path, "datasetFormat": "csv"},
            )
            assert r.status_code == 400, (path, r.text)
            answers.append(r.json()["error"]["message"])
            assert "root:" not in r.text and "hunter2" not in r.text and path not in r.text
    assert set(answers) == {REFUSED}  # one sentence: no oracle
    # a file under datasets_dirs is fine, by relative or absolute path
    for path in ("facts.jsonl", str(tenants.datasets / "facts.jsonl")):
        r = await tenants.http.post(
            START,
            headers=h(tenants, "alice"),
            json={"baseModel": "fake", "dataset": path, "method": "lora", "maxSteps": 1},
        )
        assert r.status_code == 200, r.text
    # the OpenAI route names data only by file id; an extra 'dataset' cannot point elsewhere
    r = await tenants.http.post(
        "/v1/fine_tuning/jobs",
        headers=h(tenants, "bob"),
        json={"model": "fake", "training_file": "file-doesnotexist", "training": {"dataset": "/etc/passwd"}},
    )
    assert r.status_code == 404 and "passwd" not in r.text


async def test_each_tenant_sees_only_its_own_files_and_jobs(tenants):
    r = await upload(tenants, "alice", FACTS.read_bytes())
    assert r.status_code == 200, r.text
    file_id = r.json()["id"]
    missing = await tenants.http.get("/v1/files/file-000000000000000000000000", headers=h(tenants, "bob"))
    for method, url in (("GET", f"/v1/files/{file_id}"), ("DELETE", f"/v1/files/{file_id}")):
        theirs = await tenants.http.request(method, url, headers=h(tenants, "bob"))
        assert theirs.status_code == 404 and theirs.json()["error"]["code"] == missing.json()["error"]["code"]
    assert file_id not in (await tenants.http.get("/v1/files", headers=h(tenants, "bob"))).text
    assert file_id in (await tenants.http.get("/v1/files", headers=h(tenants, "admin"))).text
    # bob cannot train on alice's file
    r = await tenants.http.post(
        "/v1/fine_tuning/jobs", headers=h(tenants, "bob"), json={"model": "fake", "training_file": file_id}
    )
    assert r.status_code == 404, r.text
    r = await tenants.http.post(
        "/v1/fine_tuning/jobs", headers=h(tenants, "alice"), json={"model": "fake", "training_file": file_id}
    )
    assert r.status_code == 200, r.text
    job = r.json()["id"]
    for method, url in (
        ("GET", f"/v1/fine_tuning/jobs/{job}"),
        ("POST", f"/v1/fine_tuning/jobs/{job}/cancel"),
        ("GET", f"/v1/fine_tuning/jobs/{job}/events"),
        ("GET", f"/api/v1/training/status/{job}"),
        ("GET", f"/api/v1/training/plot/{job}"),
        ("POST", f"/api/v1/training/cancel/{job}"),
    ):
        theirs = await tenants.http.request(method, url, headers=h(tenants, "bob"))
        assert theirs.status_code == 404, (url, theirs.text)
    assert job not in (await tenants.http.get("/v1/fine_tuning/jobs", headers=h(tenants, "bob"))).text
    assert job in (await tenants.http.get("/v1/fine_tuning/jobs", headers=h(tenants, "alice"))).text
    assert (
        await tenants.http.get(f"/v1/fine_tuning/jobs/{job}", headers=h(tenants, "admin"))
    ).status_code == 200
    # bounded: at most two queued or running jobs per tenant
    codes = [
        (
            await tenants.http.post(
                "/v1/fine_tuning/jobs",
                headers=h(tenants, "alice"),
                json={"model": "fake", "training_file": file_id},
            )
        ).status_code
        for _ in range(2)
    ]
    assert codes == [200, 429]
    # ids that are not ids are refused before they reach a store or a path
    r = await tenants.http.get("/v1/files/..%2f..%2fetc%2fpasswd", headers=h(tenants, "alice"))
    assert r.status_code in (400, 404) and "passwd" not in r.json()["error"]["message"].replace(
        "..%2f..%2fetc%2fpasswd", ""
    ).replace("../../etc/passwd", "")


async def test_a_fine_tuned_model_is_served_to_its_owner_only(tenants):
    alice = f"key:{tenants.keys['alice'][0]}"
    await tenants.coordinator.backends.registry.put(ModelRecord("other", alice, "fake", "peft", "/x"))
    chat = {"model": "other", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
    mine = await tenants.http.post("/v1/chat/completions", headers=h(tenants, "alice"), json=chat)
    assert mine.status_code == 200
    theirs = await tenants.http.post("/v1/chat/completions", headers=h(tenants, "bob"), json=chat)
    missing = await tenants.http.post(
        "/v1/chat/completions", headers=h(tenants, "bob"), json={**chat, "model": "nope"}
    )
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["error"]["message"].replace("other", "X") == missing.json()["error"][
        "message"
    ].replace("nope", "X")
    listed = (await tenants.http.get("/v1/models", headers=h(tenants, "bob"))).json()["data"]
    assert [m["id"] for m in listed] == ["fake"]
    assert (await tenants.http.get("/v1/models/other", headers=h(tenants, "bob"))).status_code == 404
    # a key's allow-list holds for training base models and listings too
    r = await tenants.http.post(
        START,
        headers=h(tenants, "narrow"),
        json={"baseModel": "fake", "dataset": "facts.jsonl", "maxSteps": 1},
    )
    assert r.status_code == 403, r.text
    listed = (await tenants.http.get("/api/v1/models", headers=h(tenants, "narrow"))).json()["models"]
    assert [m["id"] for m in listed] == ["other"] or listed == []
    assert (await tenants.http.get("/v1/models/fake", headers=h(tenants, "narrow"))).status_code == 404


async def test_the_public_health_route_names_no_model(tenants):
    public = await tenants.http.get("/api/v1/health")
    assert public.status_code == 200 and "fake" not in public.text and "models" not in public.text
    admin = await tenants.http.get("/api/v1/health", headers=h(tenants, "admin"))
    assert admin.json()["workers"][0]["models"] == ["fake", "other"]


async def test_priority_above_the_default_needs_a_scope(tenants):
    body = {"modelId": "fake", "prompt": "x", "maxTokens": 1, "priority": 100}
    r = await tenants.http.post("/api/v1/inference", headers=h(tenants, "bob"), json=body)
    assert r.status_code == 403 and r.json()["error"]["param"] == "priority"
    assert (
        await tenants.http.post("/api/v1/inference", headers=h(tenants, "admin"), json=body)
    ).status_code == 200


async def test_malformed_input_gets_a_4xx_not_a_5xx(tenants):
    chat = {"model": "fake", "max_tokens": 2, "messages": [{"role": "user", "content": "\ud800"}]}
    body = json.dumps(chat, ensure_ascii=True)  # '\\ud800' on the wire: a lone surrogate
    r = await tenants.http.post(
        "/v1/chat/completions",
        content=body,
        headers={**h(tenants, "alice"), "content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    file_id = (await upload(tenants, "alice", FACTS.read_bytes())).json()["id"]
    for key in ("caf\u00e9", "line\nbreak"):
        r = await tenants.http.post(
            "/v1/fine_tuning/jobs",
            headers=h(tenants, "alice"),
            json={"model": "fake", "training_file": file_id, "training": {key: 1}},
        )
        assert r.status_code == 400, r.text
    nested = b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}\n"
    r = await upload(tenants, "alice", nested)
    assert r.status_code == 400 and "nested" in r.json()["error"]["message"], r.text
    assert "Traceback" not in r.text and "RecursionError" not in r.text


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def test_bombs_are_refused_in_seconds_with_the_coordinators_memory_bounded(tenants, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Parquet: 900k identical 500-byte strings, dictionary-encoded: a few KB on disk,
    # about 900 MB once read (under the row limit: the size must stop it).
    bomb = tmp_path / "bomb.parquet"
    column = pa.array(["x" * 500] * 900_000).dictionary_encode()
    pq.write_table(pa.table({"prompt": column, "response": column}), bomb, compression="zstd")
    assert bomb.stat().st_size < 1 << 20
    # JSON: many small records, which as Python objects need far more than the
    # reader's 512 MiB limit (about 60 MB on disk)
    records = b"[" + b",".join([b'{"prompt":"a","completion":"b"}'] * 2_000_000) + b"]"
    before = _rss_mb()
    for name, content in (("bomb.parquet", bomb.read_bytes()), ("many.json", records)):
        started = time.monotonic()
        r = await upload(tenants, "alice", content, name)
        assert r.status_code == 400, r.text[:300]
        assert time.monotonic() - started < 60
        message = r.json()["error"]["message"]
        assert "decompressed" in message or "memory" in message or "records" in message, message
    assert _rss_mb() - before < 300, "the coordinator's own memory grew: parsing ran in-process"
    # and it still serves
    chat = {"model": "fake", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}
    assert (
        await tenants.http.post("/v1/chat/completions", headers=h(tenants, "bob"), json=chat)
    ).status_code == 200
    files = tmp_path / "files"
    assert not files.exists() or not list(files.iterdir()), "a refused upload left files behind"


async def test_the_allow_list_holds_for_the_model_a_job_really_trains(tenants):
    """``training.base_model`` in the extra body names the model trained: a key allowed
    only ``other`` may not train ``fake`` through it (it used to: the check read
    ``model``)."""
    file_id = (await upload(tenants, "narrow", FACTS.read_bytes())).json()["id"]
    job = {"model": "other", "training_file": file_id, "training": {"base_model": "fake", "max_steps": 1}}
    r = await tenants.http.post("/v1/fine_tuning/jobs", headers=h(tenants, "narrow"), json=job)
    assert r.status_code == 400 and "training.base_model" in r.text, r.text
    r = await tenants.http.post(
        "/v1/fine_tuning/jobs",
        headers=h(tenants, "narrow"),
        json={"model": "fake", "training_file": file_id, "training": {"max_steps": 1}},
    )
    assert r.status_code == 403, r.text
    jobs = (await tenants.http.get("/v1/fine_tuning/jobs", headers=h(tenants, "narrow"))).json()["data"]
    assert jobs == []


async def test_the_coordinator_holds_a_key_to_its_allow_list_too(tenants):
    """Defence in depth: a call that reaches the coordinator (a gateway with a bug, a
    tool holding the internal credentials) is checked against the allow-list it carries."""
    from cyllm.protocol import pb, rpc
    from cyllm.protocol.client import Stream, unary
    from cyllm.protocol.plane import load_plane
    from cyllm.protocol.tenant import Tenant

    narrow = Tenant("key:narrow", models=frozenset({"other"})).metadata()
    async with load_plane().channel(f"127.0.0.1:{tenants.coordinator.port}") as channel:
        with pytest.raises(errors.Forbidden, match="may not use model 'fake'"):
            async for _ in Stream(
                rpc.InferenceStub(channel).Generate(
                    pb.GenerateRequest(model="fake", prompt="hi"), metadata=narrow
                )
            ):
                pass
        spec = json.dumps({"base_model": "fake", "dataset": "facts.jsonl", "max_steps": 1})
        with pytest.raises(errors.Forbidden):
            await unary(
                rpc.TrainingStub(channel).CreateTrainingJob,
                pb.CreateTrainingJobRequest(spec_json=spec),
                metadata=narrow,
            )
        listed = await unary(rpc.ModelsStub(channel).ListModels, pb.ListModelsRequest(), metadata=narrow)
        assert [m.id for m in listed.models] == ["other"]
        ok = [
            m
            async for m in Stream(
                rpc.InferenceStub(channel).Generate(
                    pb.GenerateRequest(model="other", prompt="hi", sampling=pb.SamplingParams(max_tokens=2)),
                    metadata=narrow,
                )
            )
        ]
        assert ok[-1].HasField("finished")


async def test_public_metrics_name_no_tenants_model(tenants):
    """``/metrics`` is public by default: a tenant's own model is labelled as its base
    there (here it has none: "fine-tuned"), at the gateway and at the coordinator."""
    from prometheus_client import generate_latest

    alice = f"key:{tenants.keys['alice'][0]}"
    await tenants.coordinator.backends.registry.put(ModelRecord("other", alice, "fake", "peft", "/x"))
    chat = {"model": "other", "max_tokens": 2, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    r = await tenants.http.post("/v1/chat/completions", headers=h(tenants, "alice"), json=chat)
    assert r.status_code == 200
    await tenants.http.post(
        "/v1/chat/completions", headers=h(tenants, "alice"), json={**chat, "model": "fake"}
    )
    gateway = (await tenants.http.get("/metrics")).text
    coordinator = generate_latest(tenants.coordinator.metrics.registry).decode()
    for text in (gateway, coordinator):
        assert 'model="other"' not in text
        assert 'model="fine-tuned"' in text and 'model="fake"' in text


async def test_a_jobs_adapter_size_is_bounded_from_a_plain_key(tenants):
    """``options: {"r": 4096}`` took a training process to 4.1 GB; now refused by name
    (and a job that still outgrows its memory is stopped: test_training_runner)."""
    for options, bad in (
        ({"r": 4096}, "options.r"),
        ({"lora_alpha": -1}, "options.lora_alpha"),
        ({"target_modules": [f"m{i}" for i in range(300)]}, "options.target_modules"),
    ):
        r = await tenants.http.post(
            START,
            headers=h(tenants, "alice"),
            json={"baseModel": "fake", "dataset": "facts.jsonl", "maxSteps": 1, "options": options},
        )
        assert r.status_code == 400 and bad in r.json()["error"]["message"], r.text


async def test_a_stored_response_is_its_owners_alone(tenants):
    """/v1/responses keeps what it answers for the tenant who asked: another tenant's id
    is a 404 (read, continued, listed, deleted), as a missing one."""
    r = await tenants.http.post(
        "/v1/responses", headers=h(tenants, "alice"), json={"model": "fake", "input": "my secret plan"}
    )
    assert r.status_code == 200, r.text
    rid = r.json()["id"]
    assert (await tenants.http.get(f"/v1/responses/{rid}", headers=h(tenants, "alice"))).status_code == 200
    for method, path, body in [
        ("GET", f"/v1/responses/{rid}", None),
        ("GET", f"/v1/responses/{rid}/input_items", None),
        ("DELETE", f"/v1/responses/{rid}", None),
        ("POST", "/v1/responses", {"model": "fake", "input": "go on", "previous_response_id": rid}),
    ]:
        theirs = await tenants.http.request(method, path, headers=h(tenants, "bob"), json=body)
        assert theirs.status_code == 404 and "my secret" not in theirs.text, (method, path, theirs.text)
    nothing = await tenants.http.get("/v1/responses/resp_nothing", headers=h(tenants, "bob"))
    assert nothing.json()["error"]["message"] == theirs.json()["error"]["message"].replace(
        rid, "resp_nothing"
    )
    items = await tenants.http.get(f"/v1/responses/{rid}/input_items", headers=h(tenants, "alice"))
    assert [i["content"][0]["text"] for i in items.json()["data"]] == ["my secret plan"]
    bad = await tenants.http.get("/v1/responses/..%2F..%2Fetc", headers=h(tenants, "alice"))
    assert bad.status_code == 404
