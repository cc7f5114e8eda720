"""Huawei MindIE, through the MindIE Server that Ascend users run (``mindieservice_daemon``).

MindIE LLM is driven by its own server process (it owns the NPUs, the weights and the
batching); its service plane speaks an OpenAI/vLLM-compatible HTTP API.  This engine is
a client of that API: ``POST /v1/chat/completions`` with ``"stream": true`` for chat,
``/v1/completions`` for raw prompts, SSE chunks turned into our events; closing the
stream cancels the request server-side.  The daemon runs beside the worker (same node or
pod) with the model named in its ``config.json``.

Spec: ``path`` is the model's weight folder (the one MindIE's ``modelWeightPath`` names);
we read its tokenizer to count and check prompts before sending.  ``engine_args``:
``endpoint`` (default ``http://127.0.0.1:1025``), ``model_name`` (MindIE's ``modelName``,
default the model id), ``timeout_s`` (default 600), ``verify`` (TLS; default true).

Not yet run on Ascend hardware (see the README's status table): tested against a fake
MindIE Server that speaks this API.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from cyllm import errors
from cyllm.worker.engines.base import Engine
from cyllm.worker.engines.planning import Plan, SamplingDefaults
from cyllm.worker.engines.prompt import messages_of
from cyllm.worker.engines.types import EngineHealth, ModelCard, Step
from cyllm.worker.model_files import folder_context_length
from cyllm.worker.settings import ModelSpec

_KNOWN_ARGS = {"endpoint", "model_name", "timeout_s", "verify"}


class MindieEngine(Engine):
    name = "mindie"
    library = "MindIE Server"

    def __init__(self, spec: ModelSpec, model_dir: Path) -> None:
        unknown = set(spec.engine_args) - _KNOWN_ARGS
        if unknown:
            raise errors.NotLoadable(
                f"model {spec.id!r}: unknown mindie engine argument(s) {', '.join(sorted(unknown))}")
        super().__init__(spec)
        self.model_dir = model_dir
        args = spec.engine_args
        self.endpoint = str(args.get("endpoint", "http://127.0.0.1:1025")).rstrip("/")
        self.model_name = str(args.get("model_name", spec.id))
        self.timeout = float(args.get("timeout_s", 600))
        self.verify = bool(args.get("verify", True))
        self.client: httpx.AsyncClient | None = None
        self._last_error = ""

    async def load(self) -> ModelCard:
        from transformers import AutoTokenizer

        self.tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.model_dir)
        self.context_length = folder_context_length(self.model_dir, self.spec.max_context)
        self.client = httpx.AsyncClient(base_url=self.endpoint, verify=self.verify,
                                        timeout=httpx.Timeout(self.timeout, connect=10))
        try:
            reply = await self.client.get("/v1/models")
            reply.raise_for_status()
            served = {m.get("id") for m in reply.json().get("data", [])}
        except (httpx.HTTPError, ValueError) as exc:
            await self.client.aclose()
            raise errors.NotLoadable(f"MindIE Server at {self.endpoint} did not answer: {exc}") from exc
        if self.model_name not in served:
            await self.client.aclose()
            raise errors.NotLoadable(
                f"MindIE Server at {self.endpoint} serves {sorted(served)}, not {self.model_name!r}")
        self.defaults = SamplingDefaults.of(self.spec)
        return ModelCard(self.spec.id, self.context_length, self.name, self.spec.max_batch_size,
                         "npu", int(time.time()))

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    def down(self) -> str:
        return "closed" if self.client is None else ""

    async def stream(self, plan: Plan) -> AsyncIterator[Step]:
        s, request = plan.sampling, plan.request
        body: dict[str, Any] = {
            "model": self.model_name, "stream": True, "max_tokens": plan.max_new,
            "temperature": s.temperature, "top_p": s.top_p,
            "stream_options": {"include_usage": True},
        }
        if s.stop:
            body["stop"] = list(s.stop)
        if s.seed is not None:
            body["seed"] = s.seed
        if request.messages is not None:
            route, body["messages"] = "/v1/chat/completions", messages_of(request)
        else:
            route, body["prompt"] = "/v1/completions", request.prompt
        counted, reason, usage = 0, None, None
        try:
            # Leaving this block (our caller gone) closes the stream: MindIE Server
            # cancels a request whose client left.
            async with self.client.stream("POST", route, json=body) as reply:
                if reply.status_code >= 400:
                    detail = (await reply.aread()).decode(errors="replace")[:500]
                    raise _http_error(reply.status_code, detail)
                async for chunk in _sse(reply):
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices", []):
                        text = choice.get("delta", {}).get("content") or choice.get("text") or ""
                        # One chunk per generated token is MindIE's (and vLLM's) stream shape.
                        counted += 1
                        yield Step(text, 1)
                        reason = choice.get("finish_reason") or reason
        except (httpx.HTTPError, httpx.StreamError) as exc:
            self._last_error = f"{type(exc).__name__}: {exc}"
            raise errors.EngineError(f"MindIE Server at {self.endpoint} failed: {exc}") from exc
        self._last_error = ""
        # The server's usage is the count that bills; add what the chunks did not show.
        extra = max(0, int(usage["completion_tokens"]) - counted) if usage else 0
        yield Step("", extra, reason or "stop")

    def health(self) -> EngineHealth:
        h = super().health()
        if h.healthy and self._last_error:
            h.healthy, h.detail = False, self._last_error
        return h


async def _sse(reply: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for line in reply.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            yield json.loads(data)
        except ValueError as exc:
            raise errors.EngineError(f"MindIE sent a malformed stream chunk: {data[:200]!r}") from exc


def _http_error(status: int, detail: str) -> errors.CyllmError:
    if status == 400 or status == 422:
        return errors.InvalidRequest(f"MindIE refused the request: {detail}")
    if status == 404:
        return errors.ModelNotFound(f"MindIE does not serve this model: {detail}")
    if status in (429, 503):
        return errors.Overloaded(f"MindIE is busy: {detail}")
    return errors.EngineError(f"MindIE answered {status}: {detail}")
