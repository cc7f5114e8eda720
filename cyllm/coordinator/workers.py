"""The coordinator's calls to its workers: one channel per worker address, typed
calls, failures arriving as the project's errors (``protocol.client``)."""

from __future__ import annotations

import grpc

from cyllm.protocol import pb, rpc
from cyllm.protocol.client import Stream, open_channel, unary
from cyllm.protocol.plane import Plane
from cyllm.protocol.session import Session, SessionCall
from cyllm.runtime import REQUEST_ID

# Loading can take minutes (vLLM's start, a GGUF conversion); unloading drains first.
LOAD_TIMEOUT_S = 900.0
EMBED_TIMEOUT_S = 300.0  # a batch of long inputs on a CPU


class WorkerClients:
    def __init__(self, plane: Plane) -> None:
        self.plane = plane
        self._stubs: dict[str, rpc.WorkerStub] = {}
        self._sessions: dict[str, Session] = {}
        self._channels: list[grpc.aio.Channel] = []

    def _stub(self, address: str) -> rpc.WorkerStub:
        if address not in self._stubs:
            channel = open_channel(address, self.plane)
            self._channels.append(channel)
            self._stubs[address] = rpc.WorkerStub(channel)
        return self._stubs[address]

    def generate(self, address: str, request: pb.GenerateRequest, request_id: str) -> SessionCall:
        """A generation on the worker's session (``protocol/session.py``): one long-lived
        call per worker, not a call per generation."""
        session = self._sessions.get(address)
        if session is None:
            stub = self._stub(address)
            session = self._sessions[address] = Session(lambda: stub.Session())
        return session.generate(request, request_id)

    async def embed(self, address: str, request: pb.EmbedRequest, request_id: str) -> pb.EmbedResponse:
        return await unary(
            self._stub(address).Embed, request, timeout=EMBED_TIMEOUT_S, metadata=((REQUEST_ID, request_id),)
        )

    async def tokenize(
        self, address: str, request: pb.TokenizeRequest, request_id: str
    ) -> pb.TokenizeResponse:
        return await unary(
            self._stub(address).Tokenize,
            request,
            timeout=EMBED_TIMEOUT_S,
            metadata=((REQUEST_ID, request_id),),
        )

    async def load_model(self, address: str, request: pb.LoadModelRequest) -> pb.LoadModelResponse:
        return await unary(self._stub(address).LoadModel, request, timeout=LOAD_TIMEOUT_S)

    async def unload_model(self, address: str, request: pb.UnloadModelRequest) -> pb.UnloadModelResponse:
        return await unary(self._stub(address).UnloadModel, request, timeout=LOAD_TIMEOUT_S)

    async def forget(self, address: str, request: pb.ForgetRequest) -> pb.ForgetResponse:
        return await unary(self._stub(address).Forget, request, timeout=LOAD_TIMEOUT_S)

    def train(self, address: str, request: pb.TrainRequest) -> Stream[pb.TrainingEvent]:
        return Stream(self._stub(address).Train(request))

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()
        for channel in self._channels:
            await channel.close()
        self._channels.clear()
        self._stubs.clear()
