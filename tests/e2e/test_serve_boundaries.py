"""``cyllm serve`` as another local user would see it (issue 12): its internal ports
answer nobody without this run's own token, and a process that dies (the worker; the
gateway, which hosts the coordinator) is restarted while the rest keeps serving."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from cyllm import errors
from cyllm.protocol import pb, rpc
from cyllm.protocol.client import unary
from cyllm.protocol.plane import Plane, load_plane
from tests.e2e.conftest import children, comes_back


def test_the_internal_ports_refuse_callers_without_this_runs_token(server):
    async def call(plane: Plane, address: str) -> None:
        async with plane.channel(address) as channel:
            await unary(rpc.ModelsStub(channel).ListModels, pb.ListModelsRequest(), timeout=5)

    # the test session's token, no token: both refused; serve made its own secret
    for plane in (load_plane(), Plane()):
        with pytest.raises(errors.Unavailable, match="internal plane"):
            asyncio.run(call(plane, server.coordinator_address))
    assert "CYLLM_INTERNAL_TOKEN" not in Path(f"/proc/{server.proc.pid}/environ").read_bytes().decode(
        errors="replace"
    )


def test_a_component_that_dies_is_restarted_and_the_service_comes_back(server):
    pids = children(server.proc.pid)
    assert set(pids) == {"worker", "gateway"}, pids
    os.kill(pids["worker"], signal.SIGKILL)
    # past the coordinator's heartbeat timeout, "ok" can only come from the new worker
    # (a request sent before then meets the dead one: failover is issue 13's subject)
    time.sleep(6)
    comes_back(server, "worker", pids["worker"])
    # the gateway hosts the coordinator: a new one knows no worker until the worker's
    # next heartbeat is refused as unknown and it registers again
    pids = children(server.proc.pid)
    os.kill(pids["gateway"], signal.SIGKILL)
    comes_back(server, "gateway", pids["gateway"])
