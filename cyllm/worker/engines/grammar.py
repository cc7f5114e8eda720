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
before anything runs.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from cyllm import errors
from cyllm.worker.engines.types import Constraint

PARAM = "response_format"
_SOURCE = re.compile(r"^\[[\d:]+\] \S+:\d+: ")
_CACHED = 64  # compiled grammars kept per vocabulary


class Grammars:
    """Compiles constraints for one vocabulary; the last ``_CACHED`` are kept."""

    def __init__(self, info: Any) -> None:
        import xgrammar as xgr

        self.info = info
        self.compiler = xgr.GrammarCompiler(info, max_threads=2)
        self._compiled: OrderedDict[Constraint, Any] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, vocab_size: int, stop_ids: Iterable[int]) -> Grammars:
        """For a Hugging Face tokenizer; ``vocab_size`` is the model's (its logits' width)."""
        import xgrammar as xgr

        return cls(xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids)))

    @classmethod
    def for_pieces(cls, pieces: Sequence[bytes], stop_ids: Iterable[int]) -> Grammars:
        """For a vocabulary given as each token's bytes (llama.cpp's GGUF models)."""
        import xgrammar as xgr

        return cls(xgr.TokenizerInfo(list(pieces), xgr.VocabType.RAW,
                                     vocab_size=len(pieces), stop_token_ids=sorted(stop_ids)))

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    def compile(self, constraint: Constraint) -> Any:
        """The compiled grammar, or InvalidRequest naming what the compiler refused."""
        with self._lock:
            if constraint in self._compiled:
                self._compiled.move_to_end(constraint)
                return self._compiled[constraint]
        schema = constraint.schema if constraint.kind == "json_schema" else '{"type": "object"}'
        try:
            compiled = self.compiler.compile_json_schema(schema, any_whitespace=False,
                                                         strict_mode=True)
        except Exception as exc:  # noqa: BLE001  (xgrammar raises several kinds)
            why = _SOURCE.sub("", str(exc)).strip()  # without its log prefix (time, file:line)
            raise errors.InvalidRequest(
                f"the JSON schema cannot be used for constrained decoding: {why}",
                param=PARAM) from None
        with self._lock:
            self._compiled[constraint] = compiled
            while len(self._compiled) > _CACHED:
                self._compiled.popitem(last=False)
        return compiled

    def matcher(self, compiled: Any, resumed: Sequence[int] = ()) -> Matcher:
        return Matcher(self, compiled, resumed)


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
                    "resume carries tokens the response format does not allow", param="resume")

    def apply(self, logits: Any) -> None:
        """Disallow, in the 1-D float32 torch tensor ``logits`` (in place), every token
        the grammar does not allow next."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        row = logits if logits.is_contiguous() else logits.contiguous()
        self._xgr.apply_token_bitmask_inplace(row.view(1, -1), self.bitmask,
                                              vocab_size=self.vocab_size)
        if row is not logits:  # a strided view (llama.cpp's candidates): write it back
            logits.copy_(row)

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(token):
            raise errors.EngineError(f"token {token} broke the response format's grammar")

