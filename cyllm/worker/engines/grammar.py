"""Constrained decoding, written once for every engine that samples token by token
(transformers, llama.cpp): a request's ``Constraint`` (a JSON object, or a JSON Schema)
compiled by xgrammar for the engine's vocabulary, and one ``Matcher`` per sequence that
masks the logits before each token and follows the tokens chosen.

A matcher for a resumed generation has already followed the resumed tokens, so the
continuation is held to the same grammar from where the first worker stopped.  The
grammar admits an end token only once the JSON is complete, so every output that ends
with ``stop`` parses (and validates against the schema); one cut by ``max_tokens`` ends
with ``length``.  JSON is generated compact (no free whitespace): a small model given
free whitespace may spend its whole budget on blank lines.

Engines whose library constrains decoding itself (vLLM) still compile here first: the
same library (xgrammar is vLLM's default backend) refuses a bad schema with a message
before anything runs, and one that takes too long to compile never reaches it.

Compiling is never done on the event loop, and a caller's schema is compiled first in
a child process under a deadline (``grammar_guard.py``): xgrammar's compile time has no
bound of its own.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from cyllm import errors
from cyllm.worker.engines.grammar_guard import COMPILING_FOR, PARAM, compile_schema, guard, refusal
from cyllm.worker.engines.types import Constraint

_CACHED = 64  # compiled grammars kept per vocabulary, and schemas refused
TIMEOUT_S = 10.0  # a schema's compile, in the guard's child process (grammar_guard.py)
_JSON_OBJECT = '{"type": "object"}'


class Grammars:
    """Compiles constraints for one vocabulary, each new schema first under the guard's
    deadline (``grammar_guard.py``) and then here on a thread, never on the event loop;
    the last ``_CACHED`` compiled grammars are kept, and the last schemas refused, so a
    schema sent again costs nothing."""

    def __init__(self, info: Any, timeout_s: float = TIMEOUT_S) -> None:
        import xgrammar as xgr

        self.info = info
        self.compiler = xgr.GrammarCompiler(info, max_threads=2)
        self.timeout_s = timeout_s
        self.vocabulary = guard.vocabulary()  # its number in the guard's child
        self._compiled: OrderedDict[Constraint, Any] = OrderedDict()
        self._refused: OrderedDict[Constraint, str] = OrderedDict()  # why
        self._pending: dict[Constraint, asyncio.Task[Any]] = {}

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, vocab_size: int, stop_ids: Iterable[int]) -> Grammars:
        """For a Hugging Face tokenizer; ``vocab_size`` is the model's (its logits' width)."""
        import xgrammar as xgr

        return cls(
            xgr.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids)
            )
        )

    @classmethod
    def for_pieces(cls, pieces: Sequence[bytes], stop_ids: Iterable[int]) -> Grammars:
        """For a vocabulary given as each token's bytes (llama.cpp's GGUF models)."""
        import xgrammar as xgr

        return cls(
            xgr.TokenizerInfo(
                list(pieces), xgr.VocabType.RAW, vocab_size=len(pieces), stop_token_ids=sorted(stop_ids)
            )
        )

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    async def compile(self, constraint: Constraint, keep: bool = True) -> Any:
        """The compiled grammar, or InvalidRequest naming what the compiler refused (or
        that it took too long).  Callers of one new schema share its compile, which
        goes on if they are cancelled (its result is kept).  ``keep`` False (a library
        that compiles the grammar itself): the schema is only checked, None returned."""
        if constraint in self._compiled:
            self._compiled.move_to_end(constraint)
            return self._compiled[constraint]
        if constraint in self._refused:
            raise errors.InvalidRequest(self._refused[constraint], param=PARAM)
        task = self._pending.get(constraint)
        if task is None:
            task = self._pending[constraint] = asyncio.create_task(self._compile_new(constraint, keep))
            task.add_done_callback(lambda t: self._settled(constraint, t))
        return await asyncio.shield(task)

    def _settled(self, constraint: Constraint, task: asyncio.Task[Any]) -> None:
        self._pending.pop(constraint, None)
        if not task.cancelled():
            task.exception()  # retrieved: every caller may have gone (it is kept anyway)

    async def _compile_new(self, constraint: Constraint, keep: bool) -> Any:
        schema = constraint.schema if constraint.kind == "json_schema" else _JSON_OBJECT
        try:
            if constraint.kind == "json_schema":  # ours for json_object: no need to try it
                await guard.check(self.vocabulary, self.info, schema, self.timeout_s, COMPILING_FOR.get())
            compiled = await asyncio.to_thread(self._compile_here, schema) if keep else None
        except errors.InvalidRequest as exc:
            _keep(self._refused, constraint, exc.message)
            raise
        _keep(self._compiled, constraint, compiled)
        return compiled

    def _compile_here(self, schema: str) -> Any:
        try:
            return compile_schema(self.compiler, schema)
        except Exception as exc:
            raise errors.InvalidRequest(
                f"the JSON schema cannot be used for constrained decoding: {refusal(exc)}", param=PARAM
            ) from None

    def matcher(self, compiled: Any, resumed: Sequence[int] = ()) -> Matcher:
        return Matcher(self, compiled, resumed)

    def close(self) -> None:
        guard.forget(self.vocabulary)


def _keep(cache: OrderedDict[Constraint, Any], key: Constraint, value: Any) -> None:
    cache[key] = value
    while len(cache) > _CACHED:
        cache.popitem(last=False)


class Matcher:
    """One sequence's place in its grammar."""

    def __init__(self, grammars: Grammars, compiled: Any, resumed: Sequence[int] = ()) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = grammars.vocab_size
        self.bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        for token in resumed:
            if not self.matcher.accept_token(token):
                raise errors.InvalidRequest(
                    "resume carries tokens the response format does not allow", param="resume"
                )

    def apply(self, logits: Any) -> None:
        """Disallow, in the 1-D float32 torch tensor ``logits`` (in place), every token
        the grammar does not allow next."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        row = logits if logits.is_contiguous() else logits.contiguous()
        self._xgr.apply_token_bitmask_inplace(row.view(1, -1), self.bitmask, vocab_size=self.vocab_size)
        if row is not logits:  # a strided view (llama.cpp's candidates): write it back
            logits.copy_(row)

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(token):
            raise errors.EngineError(f"token {token} broke the response format's grammar")
