"""What a caller sends cannot hold up the worker's event loop, which relays every other
stream: a JSON schema never compiles on it, and one that takes too long is refused with
a 400 while its compile is killed (``grammar_guard.py``); a long prompt is tokenised on a
thread; a request with no response format builds nothing of xgrammar's.  The real
default model and its vocabulary."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest
from transformers import AutoTokenizer

from cyllm import errors
from cyllm.worker.engines.grammar import Grammars
from cyllm.worker.engines.grammar_guard import COMPILING_FOR, CompileGuard, guard
from cyllm.worker.engines.transformers_engine import TransformersEngine
from cyllm.worker.engines.types import Constraint, GenerationRequest, SamplingParams
from tests.engines.conftest import default_folder, spec

# 100 properties of nested counted repetitions: 8 KB (within the gateway's 32 KiB for a
# schema), and about two minutes of xgrammar's CPU here (20 of them took 23 s).
SLOW = json.dumps(
    {
        "type": "object",
        "properties": {
            f"p{i}": {
                "type": "string",
                "pattern": "^([a-z0-9]{1,32}\\.){1,32}[a-z]{2,%s}$".replace("%s", str(8 + i)),
            }
            for i in range(100)
        },
    }
)
FINE = json.dumps({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class LoopWatch:
    """The longest the event loop went without running this task's 10 ms ticks."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last)
            last = now

    async def __aenter__(self) -> LoopWatch:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        await asyncio.sleep(0.05)  # ticking before what is watched starts
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._task is not None
        await asyncio.sleep(0.02)  # a tick after it ended
        self._task.cancel()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_folder())


async def test_a_schema_that_compiles_too_long_is_refused_and_its_compile_killed(tokenizer):
    grammars = await asyncio.to_thread(Grammars.for_tokenizer, tokenizer, 49152, [0, 2])
    grammars.timeout_s = 1.0
    # The guard's child starts with the first schema (not counted in any deadline).
    assert await grammars.compile(Constraint("json_schema", FINE)) is not None
    child = guard.pid
    assert child is not None and alive(child)

    async with LoopWatch() as loop:
        started = time.perf_counter()
        with pytest.raises(errors.InvalidRequest) as refused:
            await grammars.compile(Constraint("json_schema", SLOW))
        took = time.perf_counter() - started
    assert refused.value.param == "response_format"
    assert "did not compile for constrained decoding within 1 s" in refused.value.message
    assert 1.0 <= took < 10, took
    assert not alive(child), "the compile in progress was killed with its process"
    assert loop.longest < 0.5, f"the event loop stalled {loop.longest:.2f} s"

    # The same schema again is refused at once, from memory; no compile starts.
    started = time.perf_counter()
    with pytest.raises(errors.InvalidRequest):
        await grammars.compile(Constraint("json_schema", SLOW))
    assert time.perf_counter() - started < 0.5
    assert guard.pid is None

    # Others' schemas compile again (in a new child), and their grammars work.
    other = json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}})
    compiled = await grammars.compile(Constraint("json_schema", other))
    assert guard.pid not in (None, child)
    matcher = grammars.matcher(compiled)
    assert matcher.matcher.accept_token(tokenizer.convert_tokens_to_ids("{"))
    grammars.close()


async def test_a_compile_that_outgrows_its_memory_is_refused_and_the_guard_goes_on(tokenizer):
    """The slow schema's compile grows by megabytes a second: with 100 MiB of address
    space allowed (the default is 2 GiB) it is stopped there, before its deadline."""
    grammars = await asyncio.to_thread(Grammars.for_tokenizer, tokenizer, 49152, [0, 2])
    small = CompileGuard(memory_bytes=100 << 20)
    vocabulary = small.vocabulary()
    try:
        with pytest.raises(errors.InvalidRequest) as refused:
            await small.check(vocabulary, grammars.info, SLOW, timeout_s=120)
        assert refused.value.param == "response_format"
        assert (
            "more than the 100 MiB a compile may use" in refused.value.message
            or "ran out of resources" in refused.value.message
        ), refused.value.message
        await small.check(vocabulary, grammars.info, FINE, timeout_s=30)
    finally:
        small.close()


async def test_the_compiler_s_refusal_comes_from_the_child_by_name(tokenizer):
    grammars = await asyncio.to_thread(Grammars.for_tokenizer, tokenizer, 49152, [0, 2])
    with pytest.raises(errors.InvalidRequest) as refused:
        await grammars.compile(Constraint("json_schema", '{"type": "nonsense"}'))
    assert refused.value.param == "response_format"
    assert refused.value.message.startswith("the JSON schema cannot be used for constrained")
    grammars.close()


async def test_callers_of_one_new_schema_share_its_compile_and_survive_a_cancelled_one(tokenizer):
    grammars = await asyncio.to_thread(Grammars.for_tokenizer, tokenizer, 49152, [0, 2])
    schema = Constraint(
        "json_schema", json.dumps({"type": "object", "properties": {"k": {"type": "string", "maxLength": 7}}})
    )
    first = asyncio.create_task(grammars.compile(schema))
    await asyncio.sleep(0)
    first.cancel()  # a caller that hung up: the compile goes on for the next
    results = await asyncio.gather(grammars.compile(schema), grammars.compile(schema))
    assert results[0] is results[1]
    assert await grammars.compile(schema) is results[0]
    grammars.close()


async def test_a_request_without_a_response_format_builds_no_grammar():
    engine = TransformersEngine(spec(path=default_folder()), default_folder())
    await engine.load()
    try:
        request = GenerationRequest(
            "plain", prompt="Hello", sampling=SamplingParams(max_tokens=2, temperature=0)
        )
        async for _ in engine.generate(request):
            pass
        assert engine._grammars is None, "a vocabulary for xgrammar was read for a plain request"
    finally:
        await engine.close()


async def test_a_long_prompt_is_tokenised_off_the_event_loop():
    """A megabyte of prompt (then refused: longer than the context) took the loop a third
    of a second to tokenise; now the loop keeps ticking."""
    engine = TransformersEngine(spec(path=default_folder()), default_folder())
    await engine.load()
    long_prompt = ("The quick brown fox jumps over the lazy dog. " * 23000)[:1_000_000]
    try:
        for request in (
            GenerationRequest("long", prompt=long_prompt),
            GenerationRequest("long chat", messages=(("user", long_prompt),)),
        ):
            async with LoopWatch() as loop:
                with pytest.raises(errors.ContextLengthExceeded):
                    async for _ in engine.generate(request):
                        pass
            assert loop.longest < 0.1, f"the event loop stalled {loop.longest:.2f} s"
    finally:
        await engine.close()


async def test_one_tenants_slow_schemas_delay_anothers_new_schema_by_one_deadline(tokenizer):
    """Three slow schemas of tenant A, then a trivial new one of tenant B: B's compile
    waits for A's first (its deadline, and the child started again) and goes before A's
    other two.  One compile at a time in arrival order made B wait for all three."""
    grammars = await asyncio.to_thread(Grammars.for_tokenizer, tokenizer, 49152, [0, 2])
    grammars.timeout_s = 1.0
    assert await grammars.compile(Constraint("json_schema", FINE)) is not None  # the child is up

    async def as_tenant(tenant: str, schema: str) -> object:
        COMPILING_FOR.set(tenant)
        return await grammars.compile(Constraint("json_schema", schema))

    slow = [SLOW.replace('"p0"', f'"a{i}"') for i in range(3)]  # three distinct schemas
    theirs = [asyncio.create_task(as_tenant("a", s)) for s in slow]
    await asyncio.sleep(0.2)  # A's first is compiling; the others wait
    started = time.perf_counter()
    mine = json.dumps({"type": "object", "properties": {"b": {"type": "integer"}}})
    assert await as_tenant("b", mine) is not None
    took = time.perf_counter() - started
    assert sum(t.done() for t in theirs) <= 1, "B went before A's second and third"
    assert took < 1.0 + START_TIMEOUT_BOUND, took
    for refused in await asyncio.gather(*theirs, return_exceptions=True):
        assert isinstance(refused, errors.InvalidRequest)
    grammars.close()


START_TIMEOUT_BOUND = 10.0  # the compiler's child starting again (about 2 s) on a slow CI machine
