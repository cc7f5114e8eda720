"""A native inference request run to its answer, or as a stream of events, once for the
HTTP routes and the WebSocket.

With tools (and ``toolChoice`` other than ``none``) whether an answer is a call is
known only at its end, so a stream holds its text back and sends it at the end as one
``token`` event, or the calls in ``done`` (the OpenAI routes do the same).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from starlette.requests import HTTPConnection

from cyllm.gateway.choices import answers, merged, started, usage
from cyllm.gateway.generation import Done, Failed, Generation, Outcome
from cyllm.gateway.native.schemas import (
    Choice,
    ChoiceEnd,
    InferenceDone,
    InferenceRequest,
    InferenceResponse,
    TokenLogprob,
    ToolCall,
    Usage,
)


class Inference:
    def __init__(self, body: InferenceRequest, rid: str) -> None:
        self.body, self.rid = body, rid
        self.request = body.to_request()
        self.tools = self.request.tools
        self.holds = self.tools is not None and self.tools.choice != "none"
        self.gens: list[Generation] = []

    async def start(self, conn: HTTPConnection, *, whole: bool) -> Inference:
        self.gens = await started(conn, self.request, whole=whole)
        return self

    def _end(self, text: str, outcome: Outcome) -> tuple[str | None, list[ToolCall] | None, str]:
        if self.tools is None:
            return text, None, outcome.finish_reason
        content, calls, finish = self.tools.answer(text, outcome.finish_reason)
        return content, [ToolCall.of(c) for c in calls] or None, finish

    async def answer(self) -> InferenceResponse:
        texts = await answers(self.gens)
        choices = []
        for g, text in zip(self.gens, texts):
            content, calls, finish = self._end(text, g.outcome)
            choices.append(
                Choice(
                    index=g.choice,
                    text=content,
                    finish_reason=finish,
                    tool_calls=calls,
                    logprobs=TokenLogprob.all_of(g.logprobs) if self.body.logprobs else None,
                )
            )
        first = choices[0]
        return InferenceResponse(
            id=self.rid,
            model_id=self.body.model_id,
            text=first.text,
            cached=self.gens[0].outcome.cached,
            finish_reason=first.finish_reason,
            usage=Usage.of(usage(self.gens)),
            tool_calls=first.tool_calls,
            logprobs=first.logprobs,
            choices=choices if len(choices) > 1 else None,
        )

    async def events(self) -> AsyncGenerator[tuple[str, dict[str, Any]] | Failed, None]:
        """``("token", {text, index?, logprobs?})``\\ s as they come, then ``("done",
        InferenceDone)``; or a Failed, the other choices cancelled."""
        ends: dict[int, ChoiceEnd] = {}
        async with merged([self._choice(g, ends) for g in self.gens]) as items:
            async for item in items:
                yield item
                if isinstance(item, Failed):
                    return
        first = self.gens[0].outcome
        done = InferenceDone(
            id=self.rid,
            finish_reason=ends[0].finish_reason,
            cached=first.cached,
            usage=Usage.of(usage(self.gens)),
            tool_calls=ends[0].tool_calls,
            choices=[ends[i] for i in sorted(ends)] if len(ends) > 1 else None,
        )
        yield "done", done.model_dump(by_alias=True, exclude_none=True)

    async def _choice(
        self, gen: Generation, ends: dict[int, ChoiceEnd]
    ) -> AsyncGenerator[tuple[str, dict[str, Any]] | Failed, None]:
        index = {"index": gen.choice} if self.body.n > 1 else {}
        held: list[str] = []
        async for event in gen.events():
            if isinstance(event, Failed):
                yield event
                return
            if isinstance(event, Done):
                content, calls, finish = self._end("".join(held), event.outcome)
                if self.holds and content:
                    yield "token", {"text": content, **index}
                ends[gen.choice] = ChoiceEnd(index=gen.choice, finish_reason=finish, tool_calls=calls)
            elif self.holds:
                held.append(event.text)
            else:
                token: dict[str, Any] = {"text": event.text, **index}
                if self.body.logprobs:
                    token["logprobs"] = [
                        t.model_dump(by_alias=True) for t in TokenLogprob.all_of(event.logprobs)
                    ]
                yield "token", token
