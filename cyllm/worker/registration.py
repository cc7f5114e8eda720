"""How a worker stays known to its coordinators: register (its models, capacity and
device), then heartbeat (its running count and its generated-token counter, the
progress signal); register again when a coordinator has forgotten it or the served
models changed; deregister when it stops."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from cyllm import errors
from cyllm.protocol import pb, rpc
from cyllm.protocol.client import open_channel, unary
from cyllm.protocol.plane import Plane
from cyllm.worker.engines.types import EngineHealth

log = logging.getLogger("cyllm.worker")


class Registered(Protocol):
    """What registration reads from the worker."""

    worker_id: str
    models_version: int  # bumped when the served models change
    models_changed: asyncio.Event  # set when they change, to register again at once

    @property
    def info(self) -> pb.WorkerInfo: ...

    def healths(self) -> list[EngineHealth]: ...


class Registrar:
    """One per coordinator address; ``run`` until cancelled."""

    def __init__(self, address: str, worker: Registered, plane: Plane) -> None:
        self.address = address
        self.plane = plane
        self.worker = worker

    async def run(self) -> None:
        w = self.worker
        async with open_channel(self.address, self.plane) as channel:
            stub = rpc.WorkerPoolStub(channel)
            interval, registered, version = 1.0, False, w.models_version
            while True:
                try:
                    if version != w.models_version:
                        registered, version = False, w.models_version
                    if not registered:
                        reply = await unary(
                            stub.RegisterWorker, pb.RegisterWorkerRequest(worker=w.info), timeout=5
                        )
                        interval, registered = reply.heartbeat_interval_s or 1.0, True
                        log.info("registered with coordinator %s", self.address)
                    healths = w.healths()
                    beat = await unary(
                        stub.Heartbeat,
                        pb.HeartbeatRequest(
                            worker_id=w.worker_id,
                            running=sum(h.running + h.waiting for h in healths),
                            tokens_generated=sum(h.tokens_generated for h in healths),
                        ),
                        timeout=5,
                    )
                    registered = beat.known
                except errors.CyllmError as exc:
                    if registered:
                        log.warning("coordinator %s unreachable: %s", self.address, exc.message)
                    registered = False
                try:  # sleep until the next heartbeat, or until the served models change
                    await asyncio.wait_for(w.models_changed.wait(), interval)
                except TimeoutError:
                    pass

    async def deregister(self) -> None:
        try:
            async with open_channel(self.address, self.plane) as channel:
                await unary(
                    rpc.WorkerPoolStub(channel).DeregisterWorker,
                    pb.DeregisterWorkerRequest(worker_id=self.worker.worker_id),
                    timeout=3,
                )
        except errors.CyllmError as exc:
            log.warning("could not deregister from %s: %s", self.address, exc.message)
