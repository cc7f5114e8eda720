"""The engine contract, run once for every engine (see conftest for which are real)."""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing

import pytest

from cyllm import errors
from cyllm.worker.engines.types import Finished, GenerationRequest, SamplingParams, Started, TextDelta
from tests.engines.conftest import CONTEXT

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPTS = ["The capital of France is", "Once upon a time, there was a", "1, 2, 3, 4,",
           "The best way to learn to code is"]


def raw(rid: str, prompt: str, **sampling) -> GenerationRequest:
    return GenerationRequest(rid, prompt=prompt, sampling=SamplingParams(**{"temperature": 0.0, **sampling}))


async def collect(engine, request: GenerationRequest) -> tuple[list, str, Finished]:
    events = [e async for e in engine.generate(request)]
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert isinstance(events[-1], Finished), events[-1]
    return events, text, events[-1]


async def test_load_describes_the_model(subject):
    card = subject.card
    assert card.context_length == CONTEXT or (subject.kind in ("fake", "hybrid") and card.context_length > 0)
    assert card.max_batch_size >= 1 and card.engine and card.device
    assert subject.engine.health().healthy


async def test_stream_is_started_deltas_finished(subject):
    events, text, done = await collect(subject.engine, raw("s1", PROMPTS[0], max_tokens=8))
    assert isinstance(events[0], Started) and events[0].prompt_tokens > 0
    assert all(isinstance(e, TextDelta) and e.text for e in events[1:-1])
    assert text.strip()
    assert 1 <= done.completion_tokens <= 8
    assert done.prompt_tokens == events[0].prompt_tokens


async def test_max_tokens_is_exact(subject):
    _, _, done = await collect(subject.engine, raw("m1", PROMPTS[2], max_tokens=5))
    assert (done.finish_reason, done.completion_tokens) == ("length", 5)


async def test_stop_sequence_cuts_the_text_before_it(subject):
    _, full, _ = await collect(subject.engine, raw("st1", PROMPTS[1], max_tokens=16))
    words = full.split()
    assert len(words) >= 4, full
    stop = words[2]
    cut = full[: full.index(stop)]
    _, text, done = await collect(subject.engine, raw("st2", PROMPTS[1], max_tokens=16, stop=(stop,)))
    assert done.finish_reason == "stop"
    assert text == cut and stop not in text


async def test_concurrent_requests_are_served_together(subject):
    alone = [(await collect(subject.engine, raw(f"a{i}", p, max_tokens=12)))[1:]
             for i, p in enumerate(PROMPTS)]
    peak = 0

    async def watch():
        nonlocal peak
        while True:
            peak = max(peak, subject.engine.health().running)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    together = await asyncio.gather(*(collect(subject.engine, raw(f"c{i}", p, max_tokens=12))
                                      for i, p in enumerate(PROMPTS)))
    watcher.cancel()
    assert peak >= 2
    assert all(done.finish_reason in ("stop", "length") for _, _, done in together)
    if subject.deterministic_batching:
        assert [t for _, t, _ in together] == [t for t, _ in alone]
    else:  # same lengths and a shared start: the same model, not garbage
        assert [d.completion_tokens for _, _, d in together] == [d.completion_tokens for _, d in alone]
        assert all(t[:8] == a[:8] for (_, t, _), (a, _) in zip(together, alone))


async def _idle(engine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.health().running and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert engine.health().running == 0


async def test_closing_the_stream_aborts_the_request(subject):
    async with aclosing(subject.engine.generate(raw("ab1", PROMPTS[3], max_tokens=300))) as events:
        async for event in events:
            if isinstance(event, TextDelta):
                break
    await _idle(subject.engine)
    _, text, _ = await collect(subject.engine, raw("ab2", PROMPTS[0], max_tokens=4))
    assert text


async def test_health_counts_progress(subject):
    before = subject.engine.health()
    await collect(subject.engine, raw("h1", PROMPTS[0], max_tokens=4))
    after = subject.engine.health()
    assert after.healthy and after.tokens_generated >= before.tokens_generated + 3


@pytest.mark.parametrize("request_, error, param", [
    (GenerationRequest("e1", prompt=""), errors.InvalidRequest, "prompt"),
    (GenerationRequest("e2", messages=()), errors.InvalidRequest, "messages"),
    (raw("e3", "hi", temperature=3.0), errors.InvalidRequest, "temperature"),
    (raw("e4", "hi", max_tokens=CONTEXT + 1), errors.ContextLengthExceeded, "max_tokens"),
    (raw("e5", "hello " * (CONTEXT * 2)), errors.ContextLengthExceeded, "messages"),
], ids=["empty-prompt", "empty-messages", "temperature", "max-tokens", "prompt-too-long"])
async def test_bad_requests_are_refused_before_any_event(subject, request_, error, param):
    if subject.kind in ("fake", "hybrid") and request_.request_id == "e5":
        pytest.skip("the fake counts words; its context is 4096")
    with pytest.raises(error) as info:
        await anext(aiter(subject.engine.generate(request_)))
    assert info.value.param == param
    await _idle(subject.engine)


async def test_library_failure_becomes_engine_error_and_the_engine_recovers(subject):
    if subject.fail is None:
        pytest.skip("a test double has no library to fail")
    with subject.fail():
        with pytest.raises(errors.EngineError):
            await collect(subject.engine, raw("f1", PROMPTS[0], max_tokens=20))
    await _idle(subject.engine)
    _, text, _ = await collect(subject.engine, raw("f2", PROMPTS[0], max_tokens=4))
    assert text


async def test_unknown_adapter_is_model_not_found(subject):
    request = GenerationRequest("ad1", prompt="hi", adapter="nope")
    with pytest.raises(errors.ModelNotFound):
        await anext(aiter(subject.engine.generate(request)))
