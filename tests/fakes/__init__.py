"""Test doubles of libraries and servers this machine cannot run (TensorRT-LLM, MindIE
Server, torch_npu, vllm-ascend).  Each reproduces the API surface our adapter uses —
names, argument names, result shapes, streaming, cancellation — over a toy "model"
(:class:`ToyModel`): real token ids of the model's own tokenizer, each chosen by a fixed
rule from the tokens before it, so a generation continued from a prefix goes on exactly
as it would have.  They are for tests only and prove the adapters speak those APIs,
not that the hardware path works."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).parent


class ThreadedServer:
    """An ASGI app served by uvicorn on a loopback port in a thread: ``with
    ThreadedServer(app, port) as s: s.url`` (the fake servers' common part)."""

    def __init__(self, app, port: int) -> None:
        import threading

        import uvicorn

        self.app = app
        self.url = f"http://127.0.0.1:{port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self):
        import time

        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{type(self).__name__} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(10)


_WORDS = [
    " river",
    " stone",
    " light",
    " green",
    " quiet",
    " table",
    " window",
    " music",
    " paper",
    " garden",
    " silver",
    " morning",
    " bridge",
    " yellow",
    " forest",
    " ocean",
]


class ToyModel:
    """Greedy "generation" over a real vocabulary: the next token is one of a few
    single-token words, picked from the last token and the position.  A deterministic
    function of the context, as a greedy model is."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        ids = [tokenizer.encode(w, add_special_tokens=False) for w in _WORDS]
        self.words = [i[0] for i in ids if len(i) == 1]
        assert len(self.words) >= 8, "the toy model needs single-token words"

    def next(self, context: list[int], salt: int = 0) -> int:
        return self.words[(context[-1] * 7 + len(context) + salt) % len(self.words)]

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@contextmanager
def on_path(*modules: str) -> Iterator[None]:
    """``import tensorrt_llm`` (and the other ``modules``) finds the fakes here, until exit."""
    sys.path.insert(0, str(HERE))
    try:
        yield
    finally:
        sys.path.remove(str(HERE))
        for name in list(sys.modules):
            if name.split(".")[0] in modules:
                del sys.modules[name]
