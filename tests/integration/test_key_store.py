"""The file key store under concurrent writers in separate processes (an admin creating
keys through the gateway while ``cyllm keys revoke`` runs), and a store that cannot be
read: it fails closed, with a 503 naming it, never a 500 per request."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from cyllm.gateway.app import create_app
from cyllm.gateway.keys import FileKeyStore
from cyllm.gateway.settings import GatewaySettings

WRITER = """
import asyncio, sys
from pathlib import Path
from cyllm.gateway.keys import FileKeyStore

async def main(path, tag, n):
    store = FileKeyStore(Path(path))
    made = []
    for i in range(n):
        key, _ = await store.create(f"{tag}-{i}")
        made.append(key.key_id)
        if i % 3 == 0:  # revocations interleaved, as a rotation does
            assert await store.revoke(made[-1])
    print(" ".join(made))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def test_two_processes_writing_keys_at_once_lose_nothing(tmp_path):
    path = tmp_path / "keys.json"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), tag, "40"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("gateway", "cli")
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    made = {k for out, _ in outs for k in out.split()}
    assert len(made) == 80
    stored = json.loads(path.read_text())  # whole, valid JSON
    assert set(stored) == made
    revoked = {k for k, v in stored.items() if v["revoked"]}
    assert len(revoked) == 2 * len(range(0, 40, 3))
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name], "no temporary file left behind"
    assert oct(path.stat().st_mode & 0o777) == "0o600"


async def test_a_store_that_cannot_be_read_fails_closed_with_a_503(tmp_path):
    path = tmp_path / "keys.json"
    store = FileKeyStore(path)
    _, secret = await store.create("admin", admin=True)
    app = create_app(GatewaySettings(auth_enabled=True, api_keys_file=path, coordinators=["127.0.0.1:1"]))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://localhost"
        ) as http:
            auth = {"Authorization": f"Bearer {secret}"}
            assert (await http.get("/admin/keys", headers=auth)).status_code == 200
            path.write_text('{"truncated": ')  # what a crashed writer used to leave
            for route in ("/admin/keys", "/v1/models"):
                r = await http.get(route, headers=auth)
                assert r.status_code == 503, r.text
                assert "API key store" in r.json()["error"]["message"]
                assert str(path) not in r.text  # where it lives is the operator's business
            r = await http.get("/v1/models", headers={"Authorization": "Bearer cy_nope_nope"})
            assert r.status_code == 503  # closed for everyone, not open


@pytest.mark.parametrize("content", ["[]", '{"k": 1}', "\x00\x01"])
async def test_a_store_of_the_wrong_shape_is_refused_by_name(tmp_path, content):
    path = tmp_path / "keys.json"
    path.write_text(content)
    store = FileKeyStore(path)
    with pytest.raises(Exception, match="API key store"):
        await store.verify("cy_abc_def")
