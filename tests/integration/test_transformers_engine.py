"""The transformers engine in-process with the real default model."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest
import pytest_asyncio

from cyllm import errors
from cyllm.worker.engines.factory import create_engine
from cyllm.worker.engines.types import Finished, GenerationRequest, SamplingParams, Started, TextDelta
from cyllm.worker.settings import WorkerSettings, default_models
from tests.polling import returns, until

pytestmark = pytest.mark.asyncio(loop_scope="module")

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three colors.",
    "Explain gravity in one sentence to a child.",
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine():
    # float32: these tests compare answers token for token across batch shapes, which
    # only float32 keeps stable on CPU (bfloat16, the default where the CPU has it, is not
    # batch-invariant; the contract tests and the e2e server run it).
    spec = default_models()[0].model_copy(update={"max_batch_size": 8, "dtype": "float32"})
    eng = create_engine(spec, WorkerSettings().cache_dir)
    await eng.load()
    yield eng
    await eng.close()


def chat(rid: str, question: str, **sampling) -> GenerationRequest:
    return GenerationRequest(
        rid, messages=(("user", question),), sampling=SamplingParams(**{"temperature": 0, **sampling})
    )


async def run(engine, request: GenerationRequest) -> tuple[str, Finished]:
    text, done = "", None
    async for ev in engine.generate(request):
        if isinstance(ev, TextDelta):
            text += ev.text
        elif isinstance(ev, Finished):
            done = ev
    return text, done


async def test_batched_outputs_equal_sequential_outputs(engine):
    alone = [await run(engine, chat(f"s{i}", q, max_tokens=24)) for i, q in enumerate(QUESTIONS)]

    async def staggered(i: int, q: str):
        await asyncio.sleep(0.2 * i)  # joins a batch that is already decoding
        return await run(engine, chat(f"c{i}", q, max_tokens=24))

    together = await asyncio.gather(*(staggered(i, q) for i, q in enumerate(QUESTIONS)))
    assert [t for t, _ in together] == [t for t, _ in alone]
    assert [f.completion_tokens for _, f in together] == [f.completion_tokens for _, f in alone]
    assert "Paris" in alone[0][0]


async def test_max_tokens_and_usage(engine):
    text, done = await run(engine, chat("m", "Write a long story about a dragon.", max_tokens=5))
    assert done.finish_reason == "length" and done.completion_tokens == 5
    assert done.prompt_tokens > 10 and text
    _, one = await run(engine, chat("m1", "Write a long story about a dragon.", max_tokens=1))
    assert one.completion_tokens == 1


async def test_stop_string_is_cut_and_not_emitted(engine):
    text, done = await run(engine, chat("st", QUESTIONS[0], max_tokens=20, stop=("Paris",)))
    assert done.finish_reason == "stop"
    assert text == "The capital of France is "


async def test_raw_prompt_skips_the_chat_template(engine):
    req = GenerationRequest(
        "raw", prompt="The capital of France is", sampling=SamplingParams(max_tokens=4, temperature=0)
    )
    events = [ev async for ev in engine.generate(req)]
    assert isinstance(events[0], Started) and events[0].prompt_tokens < 10


async def test_closing_the_stream_aborts_and_frees_the_slot(engine):
    stream = engine.generate(chat("ab", "Write a very long story.", max_tokens=500))
    async with aclosing(stream):
        async for ev in stream:
            if isinstance(ev, TextDelta):
                break
        assert engine.health().running == 1
    await until(
        lambda: returns(engine.health().running),
        lambda r: r == 0,
        timeout=5,
        what="the aborted sequence to leave the engine",
    )
    _, done = await run(engine, chat("after", QUESTIONS[0], max_tokens=12))
    assert done.finish_reason == "stop"


async def test_requests_that_do_not_fit_are_refused_before_starting(engine):
    with pytest.raises(errors.ContextLengthExceeded, match="8192"):
        await run(engine, chat("big", QUESTIONS[0], max_tokens=9000))
    with pytest.raises(errors.ContextLengthExceeded, match="prompt has"):
        await run(engine, GenerationRequest("long", prompt="word " * 9000))
    with pytest.raises(errors.InvalidRequest, match="empty"):
        await run(engine, GenerationRequest("empty", prompt=""))
    assert engine.health().running == 0


async def test_closing_one_of_two_requests_with_the_same_id_leaves_the_other(engine):
    # Request ids come from callers; the engine must not confuse two that share one.
    alone, alone_done = await run(engine, chat("solo", QUESTIONS[1], max_tokens=24))
    first = engine.generate(chat("same", "Write a very long story.", max_tokens=500))
    async with aclosing(first):
        async for ev in first:
            if isinstance(ev, TextDelta):
                break
        second = asyncio.create_task(run(engine, chat("same", QUESTIONS[1], max_tokens=24)))
        await asyncio.sleep(0.3)  # the second is decoding beside the first
    # The first is closed (its slot freed) while the second runs on.
    text, done = await second
    assert (text, done) == (alone, alone_done)
