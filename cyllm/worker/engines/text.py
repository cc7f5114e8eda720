"""Engine-independent text handling for the engines that sample token by token
themselves (transformers, llama.cpp, the fake): incremental detokenisation, stop
strings, and the one rule that decides when a sequence ends (:class:`Stopper`)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Protocol

from cyllm.worker.engines.types import Step, TokenLogprob


class Decoder(Protocol):
    def push(self, token_id: int) -> str:
        """Text that became final with this token (may be empty)."""

    def flush(self) -> str:
        """What is still held when the sequence ends."""


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas with a Hugging Face tokenizer.

    Decoding token by token breaks multi-byte characters and BPE merges, so each step
    decodes a short window ending at the newest token and emits only what became
    stable (the prefix/read offset scheme of TGI and vLLM).
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int]) -> None:
        self._tok = tokenizer
        self._ids: list[int] = list(prompt_ids[-6:])  # context so the first token decodes right
        self._prefix = 0
        self._read = len(self._ids)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        decode = self._tok.decode
        before = decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self._ids[self._prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        # What is held back ends in an incomplete character; it is dropped, as vLLM's
        # detokenizer drops it, rather than shown as U+FFFD.
        return ""


class StopMatcher:
    """Cuts generated text at the first stop string, never emitting part of one.

    Text that could still become a stop string is held back until it cannot.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        if not self._stops:
            return text, False
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[: min(hits)], True
        keep = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class Stopper:
    """One sequence's end rule, token by token.

    An end-of-sequence id ends it (``stop``; the id itself is counted, not decoded), so
    does a stop string (the text is cut before it), so does the ``max_new``-th token
    (``length``).  At an end that is not a stop string, text held back because it
    might have begun one is released.  A Step comes out only when there is text or an
    end, carrying every token id since the last one, so a token whose text is held
    back costs no event.  A library that decides the end itself (MindIE) says so with
    ``finish``.
    """

    def __init__(self, decoder: Decoder, eos: Collection[int], stops: Sequence[str], max_new: int) -> None:
        self.decoder = decoder
        self.eos = eos
        self.matcher = StopMatcher(stops)
        self.max_new = max_new
        self.generated = 0
        self._pending: list[int] = []  # token ids not yet carried by a Step
        self._logprobs: list[TokenLogprob] = []  # and their logprobs, where asked

    def push(self, token_id: int, logprob: TokenLogprob | None = None) -> Step | None:
        self.generated += 1
        self._pending.append(token_id)
        if logprob is not None and token_id not in self.eos:  # an end is no content
            self._logprobs.append(logprob)
        if token_id in self.eos:
            return self._end("", "stop")
        text, hit = self.matcher.push(self.decoder.push(token_id))
        if hit:
            return self._step(text, "stop")
        if self.generated >= self.max_new:
            return self._end(text, "length")
        return self._step(text, None) if text else None

    def finish(self, reason: str) -> Step:
        """The library ended the sequence (``reason`` in its own words)."""
        return self._end("", reason)

    def _end(self, text: str, reason: str) -> Step:
        tail, hit = self.matcher.push(self.decoder.flush())
        return self._step(text + tail + ("" if hit else self.matcher.flush()), reason)

    def _step(self, text: str, reason: str | None) -> Step:
        step = Step(text, tuple(self._pending), reason, tuple(self._logprobs))
        self._pending, self._logprobs = [], []
        return step
