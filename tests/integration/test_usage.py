"""The usage ledger and budgets on an in-process stack with the fake engine: every
generation, embedding and batch line is counted for its caller, a tenant reads only its
own, an admin everyone's (JSON and CSV); budgets warn, then refuse with when they reset,
hold under concurrent requests, and still hold after the gateway restarts."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from pathlib import Path

import pytest

from cyllm.coordinator.ledger import Grouping, RedisLedger, SqliteLedger
from cyllm.coordinator.sqlite import Database
from cyllm.protocol import pb
from tests.integration.conftest import BOTH_WAYS, fake_model
from tests.integration.test_batches import FAST, bearer, finished, submit
from tests.polling import until

FACTS = Path(__file__).parents[1] / "data" / "facts.jsonl"

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}
GATEWAY = {"auth_enabled": True, "usage_report_s": 0.1, **FAST}


async def keyed_stack(make_stack, tmp_path, **gateway):
    stack = await make_stack(
        [fake_model("fake"), fake_model("other")],
        gateway={"api_keys_file": tmp_path / "keys.json", **GATEWAY, **gateway},
        files_dir=tmp_path / "files",
        state_db=tmp_path / "state.db",
    )
    stack.h, stack.ids = {}, {}
    for name, kw in {"admin": {"admin": True}, "alice": {}, "bob": {}}.items():
        key, secret = await stack.app.state.keys.create(name, **kw)
        stack.h[name], stack.ids[name] = bearer(secret), key.key_id
    return stack


async def usage(stack, who: str, **params) -> dict:
    r = await stack.http.get("/api/v1/usage", headers=stack.h[who], params=params)
    assert r.status_code == 200, r.text
    return r.json()


async def reported(stack, who: str, requests: int, **params) -> dict:
    """The caller's usage once ``requests`` requests of it reached the ledger."""
    return await until(
        lambda: usage(stack, who, **params),
        lambda u: u["total"]["requests"] >= requests,
        timeout=10,
        every=0.1,
        what=f"{requests} requests in the ledger",
    )


@BOTH_WAYS
async def test_each_request_is_counted_for_its_caller_and_read_by_its_owner(make_stack, tmp_path):
    stack = await keyed_stack(make_stack, tmp_path)
    http, alice, bob = stack.http, stack.h["alice"], stack.h["bob"]
    r = await http.post("/v1/chat/completions", headers=alice, json=CHAT)
    assert r.status_code == 200, r.text
    chat = r.json()["usage"]
    stream = await http.post("/v1/chat/completions", headers=alice, json={**CHAT, "stream": True})
    assert stream.status_code == 200
    e = await http.post(
        "/v1/completions", headers=alice, json={"model": "fake", "prompt": "a b", "max_tokens": 3}
    )
    assert e.status_code == 200, e.text
    missing = await http.post("/v1/chat/completions", headers=alice, json={**CHAT, "model": "nope"})
    assert missing.status_code == 404
    b = await http.post(
        "/v1/completions", headers=bob, json={"model": "other", "prompt": "x", "max_tokens": 2}
    )
    assert b.status_code == 200

    mine = await reported(stack, "alice", 4, group_by="route,model,outcome")
    routes = {(d["route"], d["model"], d["outcome"]): d for d in mine["data"]}
    assert set(routes) == {
        ("/v1/chat/completions", "fake", "ok"),
        ("/v1/completions", "fake", "ok"),
        ("/v1/chat/completions", "", "error"),  # a model that does not exist: no name kept
    }, mine
    routes = {(route, model): d for (route, model, _), d in routes.items()}
    chats = routes[("/v1/chat/completions", "fake")]
    assert chats["requests"] == 2 and chats["completionTokens"] == 2 * chat["completion_tokens"]
    assert chats["promptTokens"] == 2 * chat["prompt_tokens"]
    assert routes[("/v1/completions", "fake")]["completionTokens"] == e.json()["usage"]["completion_tokens"]
    assert all(d["subject"] is None for d in mine["data"])  # not grouped by it
    # A tenant reads its own, whatever it asks; an admin everyone's, or one caller's.
    assert (
        await http.get("/api/v1/usage", headers=alice, params={"subject": f"key:{stack.ids['bob']}"})
    ).status_code == 403
    everyone = await reported(stack, "admin", 5, group_by="subject")
    subjects = {d["subject"]: d["requests"] for d in everyone["data"]}
    assert subjects == {f"key:{stack.ids['alice']}": 4, f"key:{stack.ids['bob']}": 1}
    one = await usage(stack, "admin", subject=f"key:{stack.ids['bob']}", group_by="day,model")
    assert [(d["model"], d["completionTokens"]) for d in one["data"]] == [("other", 2)]
    assert one["data"][0]["start"].endswith("T00:00:00Z")

    r = await http.get(
        "/api/v1/usage",
        headers=stack.h["admin"],
        params={"group_by": "subject,model", "format": "csv"},
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert {(row["subject"], row["model"]) for row in rows} == {
        (f"key:{stack.ids['alice']}", "fake"),
        (f"key:{stack.ids['alice']}", ""),
        (f"key:{stack.ids['bob']}", "other"),
    }
    assert sum(int(row["requests"]) for row in rows) == 5

    for params, says in [
        ({"group_by": "weekday"}, "cannot group by 'weekday'"),
        ({"group_by": "day,month"}, "one period at most"),
        ({"from": "2026-13-01"}, "from: a date"),
        ({"from": "2026-12-02", "to": "2026-12-01"}, "'to' must be after 'from'"),
        ({"from": "2020-01-01", "to": "2026-01-01"}, "400 days"),
    ]:
        r = await http.get("/api/v1/usage", headers=alice, params=params)
        assert r.status_code == 400 and says in r.json()["error"]["message"], (params, r.text)


async def test_batch_lines_are_counted_as_batch_usage(make_stack, tmp_path):
    stack = await keyed_stack(make_stack, tmp_path)
    alice = stack.h["alice"]
    batch = await submit(
        stack.http,
        [
            {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": CHAT}
            for i in range(3)
        ],
        alice,
    )
    done = await finished(stack.http, batch["id"], alice)
    assert done["request_counts"]["completed"] == 3
    mine = await reported(stack, "alice", 3, group_by="route")
    assert [(d["route"], d["requests"]) for d in mine["data"]] == [("batch /v1/chat/completions", 3)]
    assert mine["total"]["completionTokens"] == done["usage"]["output_tokens"]


async def test_a_budget_warns_then_refuses_until_it_resets_and_holds_under_concurrency(make_stack, tmp_path):
    stack = await keyed_stack(make_stack, tmp_path)
    http, admin = stack.http, stack.h["admin"]
    key_id = stack.ids["alice"]
    r = await http.put(
        f"/admin/keys/{key_id}/budget", headers=admin, json={"tokens_per_day": 100, "warn_at": 0.5}
    )
    assert r.status_code == 200 and r.json()["budget"]["tokens_per_day"] == 100, r.text
    assert (
        await http.put("/admin/keys/nope/budget", headers=admin, json={"tokens_per_day": 1})
    ).status_code == 404
    bad = await http.put(f"/admin/keys/{key_id}/budget", headers=admin, json={"tokens_per_day": 0})
    assert bad.status_code == 400 and "tokens_per_day" in bad.text

    # Ten requests at once, each reserving about 4 + 10 tokens: no more than fit run.
    body = {**CHAT, "max_tokens": 10}
    replies = await asyncio.gather(
        *(http.post("/v1/chat/completions", headers=stack.h["alice"], json=body) for _ in range(10))
    )
    ok = [r for r in replies if r.status_code == 200]
    refused = [r for r in replies if r.status_code == 429]
    assert ok and refused and len(ok) + len(refused) == 10
    used = sum(r.json()["usage"]["total_tokens"] for r in ok)
    assert used <= 100
    error = refused[0].json()["error"]
    assert error["code"] == "insufficient_quota" and "100 tokens per day" in error["message"]
    assert "resets at" in error["message"] and int(refused[0].headers["retry-after"]) > 0
    assert refused[0].headers["x-cyllm-budget-reset"].endswith("T00:00:00Z")
    assert any("x-cyllm-budget-warning" in r.headers for r in ok)
    # Bob has no budget; an admin's budget view of alice's spending agrees.
    assert (await http.post("/v1/chat/completions", headers=stack.h["bob"], json=body)).status_code == 200
    await reported(stack, "alice", len(ok))
    view = (await http.get("/api/v1/usage/budget", headers=stack.h["alice"])).json()
    assert view["budget"]["tokens_per_day"] == 100 and view["tokens"]["day"]["spent"] == used
    # Budget lifted: alice runs again.
    assert (await http.delete(f"/admin/keys/{key_id}/budget", headers=admin)).json()["budget"] is None
    assert (await http.post("/v1/chat/completions", headers=stack.h["alice"], json=body)).status_code == 200


async def test_a_budget_survives_a_gateway_restart_from_the_ledger(make_stack, tmp_path):
    """A new gateway process has no counters: it starts them from the ledger's sum."""
    stack = await keyed_stack(make_stack, tmp_path, usage_report_s=0.05)
    key, secret = await stack.app.state.keys.create("capped", budget={"tokens_per_month": 30})
    h = bearer(secret)
    while (await stack.http.post("/v1/chat/completions", headers=h, json=CHAT)).status_code == 200:
        pass
    await stack.app.state.usage.flush()
    # The limiter's counters are this process's: a fresh limiter has none.
    from cyllm.gateway.ratelimit import RateLimiter

    stack.app.state.limiter = RateLimiter(stack.app.state.settings, seed=stack.app.state.client.spent_since)
    r = await stack.http.post("/v1/chat/completions", headers=h, json=CHAT)
    assert r.status_code == 429 and "30 tokens per month" in r.text, r.text


async def test_training_is_refused_while_the_months_device_seconds_are_spent(make_stack, tmp_path):
    """A job is created with its owner's budget (the coordinator stops it when the month
    has used it: test_training_jobs.py); once spent, a new job is a 429."""
    stack = await keyed_stack(make_stack, tmp_path)
    key, secret = await stack.app.state.keys.create("trainer", budget={"device_seconds_per_month": 60})
    upload = await stack.http.post(
        "/v1/files",
        headers=bearer(secret),
        files={"file": ("facts.jsonl", FACTS.read_bytes())},
        data={"purpose": "fine-tune"},
    )
    assert upload.status_code == 200, upload.text
    created = await stack.http.post(
        "/v1/fine_tuning/jobs",
        headers=bearer(secret),
        json={"model": "fake", "training_file": upload.json()["id"]},
    )
    assert created.status_code == 200, created.text
    job = await stack.coordinator.training.get(created.json()["id"])
    assert job.device_seconds_per_month == 60
    row = pb.UsageRow(
        start=int(time.time()),
        subject=f"key:{key.key_id}",
        model="fake",
        route="fine_tuning",
        outcome="ok",
        requests=1,
        device_seconds=61.0,
    )
    await stack.coordinator.backends.ledger.add([row])
    r = await stack.http.post(
        "/v1/fine_tuning/jobs", headers=bearer(secret), json={"model": "fake", "training_file": "file-x"}
    )
    assert r.status_code == 429 and "60 training device-seconds per month" in r.json()["error"]["message"], (
        r.text
    )


@pytest.fixture(params=["sqlite", "redis"])
async def ledger(request, tmp_path):
    if request.param == "sqlite":
        db = Database(tmp_path / "state.db")
        await db.start()
        yield SqliteLedger(db, retention_days=2)
        await db.close()
    else:
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(request.getfixturevalue("redis_url"))
        yield RedisLedger(client, retention_days=2)
        await client.aclose()


async def test_the_ledger_adds_up_by_hour_and_keeps_only_its_retention(ledger):
    now = int(time.time()) // 3600 * 3600
    a = {"subject": "key:a", "model": "m", "route": "/v1/completions", "outcome": "ok"}
    rows = [
        pb.UsageRow(start=now + 5, requests=1, prompt_tokens=3, completion_tokens=4, **a),
        pb.UsageRow(start=now + 50, requests=2, prompt_tokens=1, completion_tokens=1, cached_tokens=1, **a),
        pb.UsageRow(start=now - 3600, requests=1, prompt_tokens=10, **{**a, "model": "n"}),
        pb.UsageRow(
            start=now,
            requests=1,
            device_seconds=2.5,
            trained_tokens=7,
            **{**a, "subject": "jwt:b", "route": "fine_tuning"},
        ),
        pb.UsageRow(start=now - 5 * 86400, requests=1, prompt_tokens=1000, **a),  # past retention
    ]
    await ledger.add(rows)
    await ledger.add([pb.UsageRow(start=now + 1, requests=1, completion_tokens=10, **a)])
    report = await ledger.query(
        pb.UsageQuery(start=now - 30 * 86400, end=now + 3600, group_by=["hour", "model"], subject="key:a")
    )
    got = [
        (r.start, r.model, r.requests, r.prompt_tokens, r.completion_tokens, r.cached_tokens)
        for r in report.rows
    ]
    assert got == [(now - 3600, "n", 1, 10, 0, 0), (now, "m", 4, 4, 15, 1)]
    everyone = await ledger.query(pb.UsageQuery(start=now - 86400, end=now + 3600, group_by=["subject"]))
    assert [(r.subject, r.requests) for r in everyone.rows] == [("jwt:b", 1), ("key:a", 5)]
    trained = [r for r in everyone.rows if r.subject == "jwt:b"][0]
    assert trained.device_seconds == 2.5 and trained.trained_tokens == 7
    spent = await ledger.spent("key:a", now)
    assert spent.tokens == 4 + 15 and (await ledger.spent("jwt:b", now - 86400)).device_seconds == 2.5
    with pytest.raises(ValueError, match="one period"):
        Grouping.of(["day", "hour"])


async def test_a_batch_is_held_to_its_creators_budget(make_stack, tmp_path):
    """A batch's lines wait at the creator's budget like any of its requests: the batch
    slows, the budget holds."""
    stack = await keyed_stack(make_stack, tmp_path)
    key, secret = await stack.app.state.keys.create("batcher", budget={"tokens_per_day": 20})
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": CHAT}
        for i in range(6)
    ]
    batch = await submit(stack.http, lines, bearer(secret))

    async def counts():
        return (await stack.http.get(f"/v1/batches/{batch['id']}", headers=bearer(secret))).json()

    await until(counts, lambda b: b["request_counts"]["completed"] >= 1, what="a first line")
    await asyncio.sleep(1.0)  # the runner meanwhile tries the rest, and is refused
    now = await counts()
    assert now["status"] == "in_progress" and now["request_counts"]["completed"] < 6, now
    await stack.app.state.usage.flush()
    spent, _ = await stack.app.state.client.spent_since(f"key:{key.key_id}", 0)
    assert 0 < spent <= 20
