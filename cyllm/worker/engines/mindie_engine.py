"""Huawei MindIE, through the MindIE Server that Ascend users run (``mindieservice_daemon``).

MindIE LLM is driven by its own server process (it owns the NPUs, the weights and the
batching).  This engine is a client of its token interface, ``POST /infer_token`` with
``"stream": true``: we send the prompt as token ids (the model's chat template applied
here, through its Hugging Face tokenizer, as on every other engine) and read one token
id per SSE chunk (``{"token": {"id": ...}}``, then ``details.finish_reason``, the
TGI-compatible shape of MindIE's ``/infer``).  Token ids both ways are what lets a
generation resume on another worker exactly; the text is made here from the ids (our
incremental decoder) and stop strings are cut here (``text.Stopper``).  Closing the
stream cancels the request server-side.  The daemon runs beside the worker (same node
or pod) with the model named in its ``config.json``.

Spec: ``path`` is the model's weight folder (the one MindIE's ``modelWeightPath`` names);
we read its tokenizer to tokenise, count and check prompts and to detokenise.  ``engine_args``:
``endpoint`` (default ``http://127.0.0.1:1025``), ``model_name`` (MindIE's ``modelName``,
default the model id), ``timeout_s`` (default 600), ``verify`` (TLS; default true).

Not yet run on Ascend hardware (see the README's status table): tested against a fake
MindIE Server that speaks this API.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from cyllm import errors
from cyllm.worker.engines.base import Engine
from cyllm.worker.engines.planning import Plan, SamplingDefaults
from cyllm.worker.engines.text import Stopper
from cyllm.worker.engines.types import EngineHealth, ModelCard, Step
from cyllm.worker.model_files import folder_context_length
from cyllm.worker.settings import ModelSpec

_KNOWN_ARGS = {"endpoint", "model_name", "timeout_s", "verify"}
# MindIE's (TGI's) finish reasons -> ours
_REASONS = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}


class MindieEngine(Engine):
    name = "mindie"
    library = "MindIE Server"

    def __init__(self, spec: ModelSpec, model_dir: Path) -> None:
        unknown = set(spec.engine_args) - _KNOWN_ARGS
        if unknown:
            raise errors.NotLoadable(
                f"model {spec.id!r}: unknown mindie engine argument(s) {', '.join(sorted(unknown))}"
            )
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
        self.client = httpx.AsyncClient(
            base_url=self.endpoint, verify=self.verify, timeout=httpx.Timeout(self.timeout, connect=10)
        )
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
                f"MindIE Server at {self.endpoint} serves {sorted(served)}, not {self.model_name!r}"
            )
        self.defaults = SamplingDefaults.of(self.spec)
        return ModelCard(
            self.spec.id, self.context_length, self.name, self.spec.max_batch_size, "npu", int(time.time())
        )

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    def down(self) -> str:
        return "closed" if self.client is None else ""

    async def stream(self, plan: Plan) -> AsyncGenerator[Step, None]:
        assert self.client is not None  # generate() refuses a closed engine (down())
        s = plan.sampling
        assert s.temperature is not None and s.top_p is not None  # resolved by SamplingDefaults.apply
        params: dict[str, Any] = {
            "max_new_tokens": plan.max_new,
            "details": True,
            "do_sample": s.temperature > 0,
        }
        if s.temperature > 0:
            params["temperature"] = s.temperature
        if s.top_p < 1:  # MindIE takes top_p in (0, 1) only; 1.0 is "unset"
            params["top_p"] = s.top_p
        if s.seed is not None:
            params["seed"] = s.seed + 1  # MindIE's seeds start at 1
        body = {"input_id": plan.prompt_ids, "stream": True, "parameters": params}
        stopper = Stopper(self.primed_decoder(plan), self.end_ids(), s.stop, plan.max_new)
        try:
            # Leaving this block (our caller gone) closes the stream: MindIE Server
            # cancels a request whose client left.
            async with self.client.stream("POST", "/infer_token", json=body) as reply:
                if reply.status_code >= 400:
                    detail = (await reply.aread()).decode(errors="replace")[:500]
                    raise _http_error(reply.status_code, detail)
                self._last_error = ""  # it answers
                async for chunk in _sse(reply):
                    token = chunk.get("token") or {}
                    if "id" in token:
                        step = stopper.push(int(token["id"]))
                        if step is not None:
                            yield step
                            if step.finish_reason is not None:
                                return
                    reason = (chunk.get("details") or {}).get("finish_reason")
                    if reason:
                        yield stopper.finish(_REASONS.get(reason, "stop"))
                        return
        except (httpx.HTTPError, httpx.StreamError) as exc:
            self._last_error = f"{type(exc).__name__}: {exc}"
            raise errors.EngineError(f"MindIE Server at {self.endpoint} failed: {exc}") from exc
        raise errors.EngineError(f"MindIE Server at {self.endpoint} ended the stream without a finish reason")

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
