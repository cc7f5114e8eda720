"""The Batch API on an in-process stack with the fake engine: a batch's requests run
through the gateway's own routes as their creator, at the lowest priority; output and
error files in OpenAI's shapes; cancelled, refused by name, kept from other tenants,
and resumed after a restart with each request's result exactly once."""

from __future__ import annotations

import json

import httpx
import pytest

from cyllm import errors
from cyllm.coordinator.settings import CoordinatorSettings
from cyllm.gateway import batch_runner
from cyllm.gateway.app import create_app
from cyllm.gateway.auth import Identity
from cyllm.gateway.generation import BATCH_PRIORITY
from cyllm.gateway.settings import GatewaySettings
from cyllm.protocol import pb
from cyllm.protocol.tenant import Tenant
from cyllm.worker.main import WorkerServer
from cyllm.worker.settings import WorkerSettings
from tests.integration.conftest import fake_model
from tests.polling import until

FAST = {"batch_poll_s": 0.1, "rate_limit_control_rpm": 100_000}  # the tests poll often


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def line(custom_id: str, model: str = "fake", url: str = "/v1/chat/completions", **body) -> dict:
    if url == "/v1/chat/completions":
        body = {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 3, **body}
    else:
        body = {"prompt": "hi there", "max_tokens": 3, **body}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": model, **body}}


def jsonl(rows: list) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


async def upload(
    http: httpx.AsyncClient, content: bytes, headers=None, purpose: str = "batch"
) -> httpx.Response:
    return await http.post(
        "/v1/files",
        headers=headers or {},
        data={"purpose": purpose},
        files={"file": ("requests.jsonl", content, "application/octet-stream")},
    )


async def submit(http, rows, headers=None, endpoint="/v1/chat/completions") -> dict:
    f = await upload(http, jsonl(rows), headers)
    assert f.status_code == 200, f.text
    r = await http.post(
        "/v1/batches",
        headers=headers or {},
        json={"input_file_id": f.json()["id"], "endpoint": endpoint, "completion_window": "24h"},
    )
    assert r.status_code == 200, r.text
    return r.json()


async def finished(http, batch_id: str, headers=None, timeout: float = 30) -> dict:
    async def get():
        return (await http.get(f"/v1/batches/{batch_id}", headers=headers or {})).json()

    return await until(
        get,
        lambda b: b["status"] in ("completed", "failed", "expired", "cancelled"),
        timeout=timeout,
        every=0.2,
    )


async def content(http, file_id: str, headers=None) -> list[dict]:
    r = await http.get(f"/v1/files/{file_id}/content", headers=headers or {})
    assert r.status_code == 200, r.text
    return [json.loads(x) for x in r.text.splitlines()]


@pytest.fixture
async def tenants(make_stack, tmp_path):
    stack = await make_stack(
        [fake_model("fake"), fake_model("other")],
        gateway={
            "auth_enabled": True,
            "api_keys_file": tmp_path / "keys.json",
            "max_body_bytes": 1 << 20,
            **FAST,
        },
        files_dir=tmp_path / "files",
    )
    stack.h, stack.ids = {}, {}
    for name, kw in {"alice": {}, "bob": {}, "narrow": {"models": ["other"]}}.items():
        key, secret = await stack.app.state.keys.create(name, **kw)
        stack.h[name], stack.ids[name] = bearer(secret), key.key_id
    return stack


async def test_a_batch_runs_its_requests_as_their_creator_into_output_and_error_files(tenants):
    http, alice, bob = tenants.http, tenants.h["alice"], tenants.h["bob"]
    rows = [line("a"), line("b", max_tokens=5), line("gone", model="no-such-model")]
    batch = await submit(http, rows, alice)
    assert batch["status"] == "in_progress" and batch["request_counts"]["total"] == 3
    done = await finished(http, batch["id"], alice)
    assert done["status"] == "completed", done
    assert done["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    assert done["usage"]["output_tokens"] == 3 + 5 and done["usage"]["input_tokens"] > 0
    out = await content(http, done["output_file_id"], alice)
    assert [o["custom_id"] for o in out] == ["a", "b"]
    assert out[0]["response"]["status_code"] == 200 and out[0]["error"] is None
    assert out[0]["id"].startswith("batch_req_") and out[0]["response"]["request_id"]
    assert out[1]["response"]["body"]["choices"][0]["message"]["content"] == "w0 w1 w2 w3 w4"
    (err,) = await content(http, done["error_file_id"], alice)
    assert err["custom_id"] == "gone" and err["response"]["status_code"] == 404
    assert "no-such-model" in err["response"]["body"]["error"]["message"]
    files = (await http.get("/v1/files", headers=alice)).json()["data"]
    assert {f["purpose"] for f in files} == {"batch", "batch_output"}

    # Another tenant sees none of it.
    for path in (f"/v1/batches/{batch['id']}", f"/v1/files/{done['output_file_id']}/content"):
        assert (await http.get(path, headers=bob)).status_code == 404
    assert (await http.post(f"/v1/batches/{batch['id']}/cancel", headers=bob)).status_code == 404
    assert (await http.get("/v1/batches", headers=bob)).json()["data"] == []
    listed = (await http.get("/v1/batches", headers=alice)).json()
    assert [b["id"] for b in listed["data"]] == [batch["id"]] == [listed["first_id"]]


async def test_a_batch_holds_its_creator_to_the_keys_rights(tenants):
    """A key that may use only ``other`` gets 403 for ``fake`` on its lines; once revoked,
    it runs none."""
    http, narrow = tenants.http, tenants.h["narrow"]
    done = await finished(
        http, (await submit(http, [line("x"), line("y", model="other")], narrow))["id"], narrow
    )
    (ok,) = await content(http, done["output_file_id"], narrow)
    (refused,) = await content(http, done["error_file_id"], narrow)
    assert ok["custom_id"] == "y" and refused["custom_id"] == "x"
    assert refused["response"]["status_code"] == 403
    # Revoked, the key no longer runs its batches' requests.
    key_id = tenants.ids["narrow"]
    caller = Identity(f"key:{key_id}", "api_key", frozenset(), frozenset({"other"}))
    assert await tenants.app.state.auth.batch_caller(caller) == caller
    await tenants.app.state.keys.revoke(key_id)
    with pytest.raises(errors.Unauthenticated, match="revoked"):
        await tenants.app.state.auth.batch_caller(caller)


async def test_bad_batch_files_and_requests_are_refused_by_name(tenants):
    http, alice = tenants.http, tenants.h["alice"]
    cases = [
        ([line("a"), "{not json"], "line 2 of the batch file is not JSON"),
        ([line("a"), line("a")], "repeats custom_id 'a'"),
        ([{**line("a"), "url": "/v1/images"}], "url must be one of"),
        ([line("a", stream=True)], "cannot stream"),
        ([{**line("a"), "method": "GET"}], "method must be POST"),
        ([{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}], "names a model"),
        (["[1, 2]"], "not a JSON object"),
        ([json.dumps(line("a")).replace('"max_tokens": 3', '"max_tokens": NaN')], "NaN and Infinity"),
    ]
    for rows, says in cases:
        r = await upload(http, jsonl(rows), alice)
        assert r.status_code == 400 and says in r.json()["error"]["message"], (rows, r.text)
    mixed = (await upload(http, jsonl([line("a"), line("b", url="/v1/completions")]), alice)).json()["id"]
    tuned = (await upload(http, jsonl([{"prompt": "p", "completion": "c"}]), alice, "fine-tune")).json()["id"]
    creates = [
        ({"input_file_id": mixed, "endpoint": "/v1/chat/completions"}, 400, "line 2 of the batch file asks"),
        ({"input_file_id": tuned, "endpoint": "/v1/chat/completions"}, 400, "not for 'batch'"),
        ({"input_file_id": "file-nope", "endpoint": "/v1/chat/completions"}, 404, "does not exist"),
        (
            {"input_file_id": mixed, "endpoint": "/v1/chat/completions", "completion_window": "2d"},
            400,
            "hours",
        ),
        ({"input_file_id": mixed, "endpoint": "/v1/images"}, 400, "endpoint"),
        ({"input_file_id": mixed, "endpoint": "/v1/completions", "metadata": {"k" * 65: "v"}}, 400, "64"),
    ]
    for body, status, says in creates:
        r = await http.post("/v1/batches", headers=alice, json=body)
        assert r.status_code == status and says in r.text, (body, r.text)
    for path in ("/v1/batches/batch_nope", "/v1/batches/..%2F..", "/v1/files/file-nope/content"):
        assert (await http.get(path, headers=alice)).status_code == 404


async def test_cancelling_stops_a_running_batch_and_keeps_what_finished(make_stack, tmp_path):
    stack = await make_stack(
        [fake_model("fake", engine_args={"token_delay_s": 0.03})], gateway=FAST, files_dir=tmp_path / "files"
    )
    batch = await submit(stack.http, [line(f"r{i}", max_tokens=40) for i in range(12)])

    async def counts():
        return (await stack.http.get(f"/v1/batches/{batch['id']}")).json()["request_counts"]["completed"]

    await until(counts, lambda n: n >= 1, what="a first result")
    cancelling = (await stack.http.post(f"/v1/batches/{batch['id']}/cancel")).json()
    assert cancelling["status"] == "cancelling" and cancelling["cancelling_at"]
    done = await finished(stack.http, batch["id"])
    assert done["status"] == "cancelled" and done["cancelled_at"], done
    kept = done["request_counts"]["completed"]
    assert 1 <= kept < 12
    assert len(await content(stack.http, done["output_file_id"])) == kept


async def test_batch_requests_wait_behind_interactive_ones(make_stack, tmp_path):
    """One worker slot, two batch requests at once: the second waits in the queue, and an
    interactive request that arrives meanwhile is served before it."""
    stack = await make_stack(
        [fake_model("fake", max_batch_size=1, engine_args={"token_delay_s": 0.02})],
        gateway=FAST,
        files_dir=tmp_path / "files",
    )
    queue = stack.coordinator.scheduler.queue
    taken: list[int] = []
    pop = queue.pop_first

    def recorded(ready):
        task = pop(ready)
        if task is not None:
            taken.append(task.priority)
        return task

    queue.pop_first = recorded
    batch = await submit(stack.http, [line(f"r{i}", max_tokens=30) for i in range(4)])
    await until(lambda: _returns(len(queue)), lambda n: n >= 1, what="a batch request waiting")
    before = len(taken)
    r = await stack.http.post(
        "/v1/chat/completions",
        json={"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert r.status_code == 200
    done = await finished(stack.http, batch["id"])
    assert done["request_counts"]["completed"] == 4
    assert taken[before] == 0 and set(taken) - {0} == {BATCH_PRIORITY}, (before, taken)


async def _returns(value):
    return value


async def test_a_batch_goes_on_after_a_restart_with_each_result_once(tmp_path):
    """``cyllm serve``'s shape (the gateway hosting its coordinator, SQLite state): the
    gateway stops mid-batch; started again on the same state, it finishes the batch, and
    each request's result is in the output once."""

    async def up():
        app = create_app(
            GatewaySettings(embedded_coordinator="127.0.0.1:0", **FAST),
            coordinator_settings=CoordinatorSettings(
                port=0, metrics_port=None, state_db=tmp_path / "state.db", files_dir=tmp_path / "files"
            ),
        )
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        worker = WorkerServer(
            WorkerSettings(
                port=0,
                coordinators=[f"127.0.0.1:{app.state.coordinator.port}"],
                drain_timeout_s=1,
                metrics_port=None,
                models=[fake_model("fake", engine_args={"token_delay_s": 0.05})],
            )
        )
        await worker.start()
        await until(app.state.coordinator.scheduler.workers, timeout=5, what="the worker to register")
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost")
        return app, lifespan, worker, http

    async def down(lifespan, worker, http):
        await http.aclose()
        await lifespan.__aexit__(None, None, None)
        await worker.stop()

    app, lifespan, worker, http = await up()
    batch = await submit(http, [line(f"r{i}", max_tokens=20) for i in range(10)])

    async def completed():
        return (await http.get(f"/v1/batches/{batch['id']}")).json()["request_counts"]["completed"]

    await until(completed, lambda n: n >= 2, what="some results")
    await down(lifespan, worker, http)
    app, lifespan, worker, http = await up()
    try:
        mid = (await http.get(f"/v1/batches/{batch['id']}")).json()
        assert mid["status"] == "in_progress" and 2 <= mid["request_counts"]["completed"] < 10, mid
        done = await finished(http, batch["id"])
        assert done["request_counts"] == {"total": 10, "completed": 10, "failed": 0}
        out = await content(http, done["output_file_id"])
        assert [o["custom_id"] for o in out] == [f"r{i}" for i in range(10)]
    finally:
        await down(lifespan, worker, http)


async def test_only_a_gateways_own_calls_run_batches(tenants):
    """A tenant's call (one that carries tenant metadata) can neither take a batch to run
    nor report results into one."""
    as_tenant = tenants.app.state.client.acting_for(Tenant("key:someone", admin=True))
    for op, request in (
        ("ClaimBatch", pb.ClaimBatchRequest(runner="x", lease_s=10)),
        ("ReportBatch", pb.BatchReport(id="batch_x", runner="x", results=[pb.BatchResult(index=0)])),
    ):
        with pytest.raises(errors.Forbidden):
            await as_tenant.batch(op, request)


async def test_batches_take_turns_and_a_batchs_output_is_capped(make_stack, tmp_path, monkeypatch):
    """A runner gives a batch back after its turn: a short batch submitted behind a long
    one finishes first.  Past ``batch_max_output_bytes`` a batch's lines fail by name."""
    monkeypatch.setattr(batch_runner, "SLICE_S", 0.5)
    stack = await make_stack(
        [fake_model("fake", engine_args={"token_delay_s": 0.01}), fake_model("quick")],
        gateway={**FAST, "batch_concurrency": 1},
        files_dir=tmp_path / "files",
        batch_max_output_bytes=1 << 16,
    )
    long = await submit(stack.http, [line(f"l{i}", max_tokens=20) for i in range(30)])
    short = await submit(stack.http, [line(f"s{i}") for i in range(2)])
    done = await finished(stack.http, short["id"])
    assert done["request_counts"]["completed"] == 2
    assert (await stack.http.get(f"/v1/batches/{long['id']}")).json()["status"] == "in_progress"
    await finished(stack.http, long["id"], timeout=60)

    # about 0.9 KiB a line: some 70 fit in 64 KiB, the rest fail by name
    wide = await submit(stack.http, [line(f"w{i}", "quick", max_tokens=120) for i in range(160)])
    done = await finished(stack.http, wide["id"], timeout=120)
    counts = done["request_counts"]
    assert counts["total"] == 160 and counts["completed"] + counts["failed"] == 160
    assert 0 < counts["completed"] < 160, counts
    capped = await content(stack.http, done["error_file_id"])
    assert {e["error"]["code"] for e in capped} == {"batch_output_too_large"}
