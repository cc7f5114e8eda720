"""Each model computes on one thread for its life (cyllm.worker.engines.compute_thread
says why: every further thread that runs an OpenMP kernel keeps a team, and past one
team per core libgomp's threads sleep and wake at every kernel of a step).  Checked on
the real engines: the thread that builds a model is the thread that steps it, request
after request."""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import threading

import pytest

from cyllm.worker import model_files
from cyllm.worker.engines import compute_thread
from cyllm.worker.engines.types import Finished, GenerationRequest, SamplingParams
from cyllm.worker.settings import DEFAULT_GGUF
from tests.engines.conftest import default_folder, spec

pytestmark = pytest.mark.asyncio


def request(rid: str, prompt: str) -> GenerationRequest:
    return GenerationRequest(rid, prompt=prompt, sampling=SamplingParams(max_tokens=4, temperature=0.0))


async def finish(engine, rid: str, prompt: str) -> None:
    events = [e async for e in engine.generate(request(rid, prompt))]
    assert isinstance(events[-1], Finished), events[-1]


async def test_a_compute_thread_runs_every_call_on_the_same_thread_in_order():
    thread = compute_thread.ComputeThread("t")
    try:
        seen = await asyncio.gather(*(thread.run(lambda i=i: (i, threading.get_ident())) for i in range(20)))
    finally:
        thread.close()
    assert [i for i, _ in seen] == list(range(20))
    assert len({ident for _, ident in seen}) == 1
    assert seen[0][1] != threading.get_ident()


async def test_once_runs_on_a_thread_that_is_gone_afterwards():
    ran_on: list[threading.Thread] = []
    assert await compute_thread.once(lambda x: ran_on.append(threading.current_thread()) or x * 2, 21) == 42
    assert ran_on[0] is not threading.current_thread()
    ran_on[0].join(5)
    assert not ran_on[0].is_alive()
    with pytest.raises(ValueError, match="refused"):
        await compute_thread.once(lambda: (_ for _ in ()).throw(ValueError("refused")))


async def test_the_transformers_engine_loads_and_steps_on_its_scheduler_thread():
    from cyllm.worker.engines.transformers_engine import TransformersEngine

    threads: list[int] = []

    class Recording(TransformersEngine):
        def load_weights(self, dtype):
            threads.append(threading.get_ident())
            model = super().load_weights(dtype)
            forward = model.forward

            def recorded(*args, **kwargs):
                threads.append(threading.get_ident())
                return forward(*args, **kwargs)

            model.forward = recorded
            return model

    engine = Recording(spec(path=default_folder()), default_folder())
    await engine.load()
    try:
        for i in range(3):
            await finish(engine, f"r{i}", "The capital of France is")
        await engine.embed(["a text to pool"])
    finally:
        await engine.close()
    assert len(threads) > 10  # the load, the warm-up, three generations, an embedding
    assert set(threads) == {engine._thread.ident}


@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (make llama-cpp builds it)",
)
async def test_each_llama_cpp_object_is_built_and_run_on_one_thread(monkeypatch):
    import llama_cpp

    from cyllm.worker.engines.llama_cpp_engine import LlamaCppEngine

    built: dict[int, int] = {}  # id(object) -> thread that built it
    ran: list[tuple[int, int]] = []  # (id(object), thread) per generation

    class Recording(llama_cpp.Llama):
        @functools.wraps(llama_cpp.Llama.__init__)  # the engine checks its arguments by name
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built[id(self)] = threading.get_ident()

    monkeypatch.setattr(llama_cpp, "Llama", Recording)
    gguf = model_files.gguf_path(DEFAULT_GGUF)
    engine = LlamaCppEngine(spec(gguf=DEFAULT_GGUF, engine="llama_cpp", engine_args={"instances": 2}), gguf)
    run = engine._run

    def recorded(llm, *args):
        ran.append((id(llm), threading.get_ident()))
        return run(llm, *args)

    engine._run = recorded
    await engine.load()
    try:
        for i in range(3):  # one after another, then two at once: both objects in use
            await finish(engine, f"r{i}", "Once upon a time")
        await asyncio.gather(finish(engine, "a", "1, 2, 3,"), finish(engine, "b", "The sky is"))
    finally:
        await engine.close()
    assert len(built) == 2 and len(set(built.values())) == 2
    assert threading.get_ident() not in built.values()
    assert len(ran) == 5
    assert {obj for obj, _ in ran} == set(built)
    assert all(built[obj] == thread for obj, thread in ran)
