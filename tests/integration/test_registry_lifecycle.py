"""Models made here, through the APIs people use: listed and loaded on demand (also after
their worker restarted, and after going unused past their keep-alive), aliased (moves,
history, rollback; a request follows the alias), published, exported and deleted —
each tenant seeing only its own.  The fake engine stands in for a model: an adapter
named ``n`` says ``n0 n1 ...``."""

from __future__ import annotations

import io
import tarfile

import pytest

from cyllm.coordinator.registry import ModelRecord
from cyllm.worker.main import WorkerServer
from tests.integration.conftest import fake_model
from tests.polling import until


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def made(make_stack, tmp_path):
    jobs = tmp_path / "jobs"
    stack = await make_stack(
        [fake_model("fake")],
        gateway={"auth_enabled": True, "api_keys_file": tmp_path / "keys.json"},
        worker={"training_dir": jobs},
    )
    keys = {}
    for name, kw in {"alice": {}, "bob": {}, "admin": {"admin": True}}.items():
        meta, secret = await stack.app.state.keys.create(name, **kw)
        keys[name] = (f"key:{meta.key_id}", bearer(secret))
    stack.keys, stack.tmp = keys, tmp_path
    registry = stack.coordinator.backends.registry
    for n in (1, 2):
        folder = jobs / f"ftjob-{n}" / "adapter"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
        await registry.put(
            ModelRecord(
                f"fake:ft-{n}",
                keys["alice"][0],
                "fake",
                "adapter",
                str(folder),
                job_id=f"ftjob-{n}",
                evaluation={"eval_loss": 1.0 + n},
            )
        )
    return stack


def chat(model: str) -> dict:
    return {"model": model, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}


async def say(stack, who: str, model: str) -> str:
    r = await stack.http.post("/v1/chat/completions", headers=stack.keys[who][1], json=chat(model))
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


async def test_a_made_model_is_listed_to_its_owner_and_loads_on_demand(made):
    listed = (await made.http.get("/v1/models", headers=made.keys["alice"][1])).json()["data"]
    assert [m["id"] for m in listed] == ["fake", "fake:ft-1", "fake:ft-2"]
    assert [
        m["id"] for m in (await made.http.get("/v1/models", headers=made.keys["bob"][1])).json()["data"]
    ] == ["fake"]
    detail = (await made.http.get("/api/v1/models/fake:ft-1", headers=made.keys["alice"][1])).json()
    assert detail["state"] == "available" and detail["kind"] == "adapter" and detail["jobId"] == "ftjob-1"
    assert detail["evaluation"] == {"eval_loss": 2.0} and detail["path"].endswith("ftjob-1/adapter")
    assert await say(made, "alice", "fake:ft-1") == "ft-10 ft-11 ft-12"  # loaded on demand
    detail = (await made.http.get("/api/v1/models/fake:ft-1", headers=made.keys["alice"][1])).json()
    assert detail["state"] == "loaded"
    r = await made.http.post("/v1/chat/completions", headers=made.keys["bob"][1], json=chat("fake:ft-1"))
    assert r.status_code == 404  # another tenant's reads as missing


async def test_after_its_worker_restarts_a_made_model_loads_again(made):
    assert await say(made, "alice", "fake:ft-2") == "ft-20 ft-21 ft-22"
    settings = made.worker.settings
    await made.worker.stop()
    again = WorkerServer(settings)
    await again.start()
    try:
        await until(
            made.coordinator.scheduler.workers,
            lambda ws: any(v.healthy and v.record.worker_id == again.worker_id for v in ws),
            timeout=10,
            what="the restarted worker",
        )
        assert "fake:ft-2" not in {m for m in again.models.loaded}  # it restarted without it
        assert await say(made, "alice", "fake:ft-2") == "ft-20 ft-21 ft-22"
    finally:
        await again.stop()


async def test_an_unused_made_model_unloads_after_its_keep_alive_and_comes_back(made):
    registry = made.coordinator.backends.registry
    record = await registry.get("fake:ft-1")
    record.keep_alive_s = 0.5
    await registry.put(record)
    assert await say(made, "alice", "fake:ft-1") == "ft-10 ft-11 ft-12"
    engine = made.worker.models.loaded["fake"]
    assert "ft-1" in engine.adapters
    await made.worker.models.unload_idle()  # too early: still kept
    assert "ft-1" in engine.adapters
    await until(
        made.worker.models.unload_idle,
        lambda gone: gone == ["fake:ft-1"],
        timeout=5,
        what="the adapter to go idle",
    )
    assert "ft-1" not in made.worker.models.loaded["fake"].adapters
    assert await say(made, "alice", "fake:ft-1") == "ft-10 ft-11 ft-12"


async def test_an_alias_follows_its_moves_and_rolls_back(made):
    alice = made.keys["alice"][1]
    r = await made.http.put("/api/v1/aliases/support-bot", headers=alice, json={"model": "fake:ft-1"})
    assert r.status_code == 200 and r.json()["model"] == "fake:ft-1", r.text
    assert await say(made, "alice", "support-bot") == "ft-10 ft-11 ft-12"
    r = await made.http.put(
        "/api/v1/aliases/support-bot",
        headers=alice,
        json={"model": "fake:ft-2", "expect": "fake:ft-1", "reason": "better"},
    )
    assert r.status_code == 200
    assert await say(made, "alice", "support-bot") == "ft-20 ft-21 ft-22"
    stale = await made.http.put(
        "/api/v1/aliases/support-bot", headers=alice, json={"model": "fake:ft-1", "expect": "fake:ft-1"}
    )
    assert stale.status_code == 400 and "moved meanwhile" in stale.text
    history = (await made.http.get("/api/v1/aliases/support-bot", headers=alice)).json()["moves"]
    assert [(m["fromModel"], m["toModel"], m["reason"]) for m in history] == [
        ("", "fake:ft-1", "set"),
        ("fake:ft-1", "fake:ft-2", "better"),
    ]
    back = await made.http.post("/api/v1/aliases/support-bot/rollback", headers=alice)
    assert back.status_code == 200 and back.json()["model"] == "fake:ft-1"
    assert await say(made, "alice", "support-bot") == "ft-10 ft-11 ft-12"
    # another tenant has no such alias, and cannot point one at alice's model
    r = await made.http.post("/v1/chat/completions", headers=made.keys["bob"][1], json=chat("support-bot"))
    assert r.status_code == 404
    r = await made.http.put("/api/v1/aliases/mine", headers=made.keys["bob"][1], json={"model": "fake:ft-1"})
    assert r.status_code == 404
    r = await made.http.put("/api/v1/aliases/fake", headers=alice, json={"model": "fake:ft-1"})
    assert r.status_code == 400 and "a model's id" in r.text  # no shadowing a model
    for _ in range(3):  # a loaded model's listing is made anew each time (not added to)
        models = (await made.http.get("/api/v1/models", headers=alice)).json()["models"]
        entry = next(m for m in models if m["id"] == "fake:ft-1")
        assert entry["state"] == "loaded" and entry["aliases"] == ["support-bot"], entry
        assert entry["evaluation"] == {"eval_loss": 2.0}
    listed = (await made.http.get("/api/v1/aliases", headers=alice)).json()["aliases"]
    assert listed == [{"name": "support-bot", "model": "fake:ft-1", "moves": None}]


async def test_publish_export_and_delete(made, tmp_path):
    alice, bob, admin = (made.keys[n][1] for n in ("alice", "bob", "admin"))
    r = await made.http.post("/api/v1/models/fake:ft-1/publish", headers=alice, json={"everyone": True})
    assert r.status_code == 403  # admins publish
    r = await made.http.post(
        "/api/v1/models/fake:ft-1/publish", headers=admin, json={"tenants": [made.keys["bob"][0]]}
    )
    assert r.status_code == 200, r.text
    assert await say(made, "bob", "fake:ft-1") == "ft-10 ft-11 ft-12"
    r = await made.http.delete("/v1/models/fake:ft-1", headers=bob)
    assert r.status_code == 403  # published to bob, still alice's

    exported = await made.http.get("/api/v1/models/fake:ft-1/export", headers=alice)
    assert exported.status_code == 200 and exported.headers["content-type"] == "application/x-tar"
    names = tarfile.open(fileobj=io.BytesIO(exported.content)).getnames()
    assert names == ["fake_ft-1/adapter_config.json"]
    assert (await made.http.get("/api/v1/models/fake:ft-2/export", headers=bob)).status_code == 404

    await made.http.put("/api/v1/aliases/bot", headers=alice, json={"model": "fake:ft-2"})
    assert await say(made, "alice", "fake:ft-2") == "ft-20 ft-21 ft-22"  # loaded when deleted
    assert (await made.http.delete("/v1/models/fake:ft-2", headers=bob)).status_code == 404
    r = await made.http.delete("/v1/models/fake:ft-2", headers=alice)
    assert r.status_code == 200 and r.json() == {"id": "fake:ft-2", "object": "model", "deleted": True}
    assert not (tmp_path / "jobs" / "ftjob-2" / "adapter").exists()  # its artefact is gone
    assert "ft-2" not in made.worker.models.loaded["fake"].adapters
    again = await made.http.delete("/v1/models/fake:ft-2", headers=alice)
    assert again.status_code == 404
    ids = [m["id"] for m in (await made.http.get("/v1/models", headers=alice)).json()["data"]]
    assert ids == ["fake", "fake:ft-1"]
    assert (await made.http.get("/api/v1/aliases/bot", headers=alice)).status_code == 404
    r = await made.http.delete("/v1/models/fake", headers=admin)
    assert r.status_code == 400 and "configured" in r.text  # not made here: unloaded instead


async def test_a_deleted_model_a_worker_still_holds_is_no_other_tenants(made, tmp_path):
    """A worker unreachable during a delete keeps its copy: the record stays as a
    tombstone, so the copy is for admins only and its id is never taken again."""
    alice, bob, admin = (made.keys[n][1] for n in ("alice", "bob", "admin"))
    assert (await made.http.delete("/v1/models/fake:ft-1", headers=alice)).status_code == 200
    registry = made.coordinator.backends.registry
    assert await registry.get("fake:ft-1") is None and await registry.taken("fake:ft-1")
    # the copy a worker kept (loaded again here by hand, as one that missed the delete)
    folder = tmp_path / "jobs" / "kept" / "adapter"
    folder.mkdir(parents=True)
    r = await made.http.post(
        "/api/v1/models/fake:ft-1/load", headers=admin, json={"adapterPath": str(folder)}
    )
    assert r.status_code == 200, r.text
    for who in (alice, bob):
        r = await made.http.post("/v1/chat/completions", headers=who, json=chat("fake:ft-1"))
        assert r.status_code == 404, r.text
        ids = [m["id"] for m in (await made.http.get("/v1/models", headers=who)).json()["data"]]
        assert "fake:ft-1" not in ids


async def test_an_export_reads_only_a_model_folder(made, tmp_path):
    alice = made.keys["alice"][1]
    registry = made.coordinator.backends.registry
    bare = tmp_path / "jobs" / "ftjob-9" / "not-a-model"
    bare.mkdir(parents=True)
    (bare / "secrets.txt").write_text("x")
    await registry.put(ModelRecord("fake:ft-9", made.keys["alice"][0], "fake", "adapter", str(bare)))
    r = await made.http.get("/api/v1/models/fake:ft-9/export", headers=alice)
    assert r.status_code == 403 and "not a model folder" in r.text, r.text


async def test_a_rollback_checks_the_model_it_goes_back_to(made):
    """bob's alias went from a model published to him to another; once it is withdrawn,
    rolling back to it is refused as any other way of pointing at it would be."""
    alice, bob, admin = (made.keys[n][1] for n in ("alice", "bob", "admin"))
    published = {"tenants": [made.keys["bob"][0]]}
    assert (
        await made.http.post("/api/v1/models/fake:ft-1/publish", headers=admin, json=published)
    ).status_code == 200
    assert (
        await made.http.put("/api/v1/aliases/mine", headers=bob, json={"model": "fake:ft-1"})
    ).status_code == 200
    assert (
        await made.http.put("/api/v1/aliases/mine", headers=bob, json={"model": "fake"})
    ).status_code == 200
    r = await made.http.post("/api/v1/models/fake:ft-1/publish", headers=admin, json={"withdraw": True})
    assert r.status_code == 200
    back = await made.http.post("/api/v1/aliases/mine/rollback", headers=bob)
    assert back.status_code == 404, back.text
    assert (await made.http.get("/api/v1/aliases/mine", headers=bob)).json()["model"] == "fake"
    # another tenant's model's id is a free name to bob, not a model's (no oracle): his
    # alias of that name is his own, and alice's model stays hers
    folder = made.tmp / "jobs" / "ftjob-7" / "model"
    await made.coordinator.backends.registry.put(
        ModelRecord("fake-ft-7", made.keys["alice"][0], "fake", "model", str(folder))
    )
    r = await made.http.put("/api/v1/aliases/fake-ft-7", headers=bob, json={"model": "fake"})
    assert r.status_code == 200, r.text
    r = await made.http.put("/api/v1/aliases/fake-ft-7", headers=alice, json={"model": "fake"})
    assert r.status_code == 400 and "a model's id" in r.text
