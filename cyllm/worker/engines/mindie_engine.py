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

Not run on hardware here: tested against a fake MindIE Server that speaks this API.
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
from cyllm.worker.engines.base import (
    AbstractEngine,
    EngineHealth,
    Event,
    Finished,
    GenerationRequest,
    ModelCard,
    Started,
)
from cyllm.worker.engines.prompt import messages_of, plan
from cyllm.worker.engines.tracking import DeltaBuffer, RequestTracker
from cyllm.worker.engines.trtllm_engine import model_context_length
from cyllm.worker.settings import ModelSpec

_KNOWN_ARGS = {"endpoint", "model_name", "timeout_s", "verify"}


class MindieEngine(AbstractEngine):
    name = "mindie"

    def __init__(self, spec: ModelSpec, model_dir: Path) -> None:
        unknown = set(spec.engine_args) - _KNOWN_ARGS
        if unknown:
            raise errors.NotLoadable(
                f"model {spec.id!r}: unknown mindie engine argument(s) {', '.join(sorted(unknown))}")
        self.spec = spec
        self.model_dir = model_dir
        args = spec.engine_args
        self.endpoint = str(args.get("endpoint", "http://127.0.0.1:1025")).rstrip("/")
        self.model_name = str(args.get("model_name", spec.id))
        self.timeout = float(args.get("timeout_s", 600))
        self.verify = bool(args.get("verify", True))
        self.tracker = RequestTracker()
        self.client: httpx.AsyncClient | None = None
        self._last_error = ""
        self._streams: dict[str, httpx.Response] = {}
        self._aborted: set[str] = set()

    async def load(self) -> ModelCard:
        from transformers import AutoTokenizer

        self.tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.model_dir)
        self.context_length = model_context_length(self.model_dir, self.spec.max_context)
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
        self.temperature = self.spec.temperature if self.spec.temperature is not None else 1.0
        self.top_p = self.spec.top_p if self.spec.top_p is not None else 1.0
        return ModelCard(self.spec.id, self.context_length, self.name, self.spec.max_batch_size,
                         "npu", int(time.time()))

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        if self.client is None:
            raise errors.EngineError(f"MindIE engine for {self.spec.id} is closed")
        self.check_adapter(request)
        sampling, prompt_ids, max_new = plan(
            self.tokenizer, request, temperature=self.temperature, top_p=self.top_p,
            context=self.context_length, default_max_tokens=self.spec.default_max_tokens)
        body: dict[str, Any] = {
            "model": self.model_name, "stream": True, "max_tokens": max_new,
            "temperature": sampling.temperature, "top_p": sampling.top_p,
            "stream_options": {"include_usage": True},
        }
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if request.messages is not None:
            route, body["messages"] = "/v1/chat/completions", messages_of(request)
        else:
            route, body["prompt"] = "/v1/completions", request.prompt
        rid = request.request_id
        buffer, reason, usage = DeltaBuffer(), None, None
        self.tracker.start(rid)
        try:
            yield Started(len(prompt_ids))
            async with self.client.stream("POST", route, json=body) as reply:
                self._streams[rid] = reply
                if reply.status_code >= 400:
                    detail = (await reply.aread()).decode(errors="replace")[:500]
                    raise _http_error(reply.status_code, detail)
                async for chunk in _sse(reply):
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices", []):
                        text = choice.get("delta", {}).get("content") or choice.get("text") or ""
                        # One chunk per generated token is MindIE's (and vLLM's) stream shape.
                        self.tracker.produced(1)
                        delta = buffer.push(text, 1)
                        if delta is not None:
                            yield delta
                        reason = choice.get("finish_reason") or reason
            if rid in self._aborted:
                yield Finished("abort", len(prompt_ids), buffer.total)
                return
            completion = int(usage["completion_tokens"]) if usage else buffer.total
            self._last_error = ""
            yield Finished("length" if reason == "length" else "stop", len(prompt_ids), completion)
        except (httpx.HTTPError, httpx.StreamError) as exc:
            if rid in self._aborted:  # we closed the stream ourselves
                yield Finished("abort", len(prompt_ids), buffer.total)
                return
            self._last_error = f"{type(exc).__name__}: {exc}"
            raise errors.EngineError(f"MindIE Server at {self.endpoint} failed: {exc}") from exc
        finally:
            self.tracker.finish(rid)
            self._streams.pop(rid, None)
            self._aborted.discard(rid)

    async def abort(self, request_id: str) -> None:
        """Close the request's stream: MindIE Server cancels a request whose client left."""
        reply = self._streams.get(request_id)
        if reply is not None:
            self._aborted.add(request_id)
            await reply.aclose()

    def health(self) -> EngineHealth:
        return self.tracker.health(self.client is not None and not self._last_error,
                                   self._last_error)


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
