"""The engine contract, and the one ``generate`` every library adapter fills in.

``AbstractEngine`` is the contract as the worker sees it: load, generate (an async
iterator of ``types.Event``), health, close, and LoRA adapters.  Validation errors
(:class:`~cyllm.errors.InvalidRequest`) are raised by ``generate`` *before* the first
event, so callers can answer with a clean 4xx.  Closing the stream early (the caller
was cancelled or stopped iterating) aborts the request inside the engine and frees its
slot: that is the only cancellation path, and a normal one, not an error.

``Engine`` is that contract implemented once for every adapter over an inference
library (transformers, vLLM, TensorRT-LLM, MindIE, llama.cpp, and the fake)::

    generate(request)
      1. refuse if the engine is down            down()
      2. refuse an adapter it does not hold      check_adapter()
      3. plan: sampling with the model's         plan() -> prompt_ids()
         defaults, prompt ids, tokens to make;   compile_constraint()
         then the response format's grammar
      4. Started, then the library's stream      stream(plan) -> Step*
         read as Steps: text and token ids out
         as TextDelta, tokens counted (the
         progress signal), the library's finish
         reason mapped
      5. Finished; a library exception becomes EngineError naming the library

Resuming (``request.resume``: the tokens a dead worker generated and the text its
client got) is done here for every adapter: the plan's prompt is the prompt plus those
tokens, its length what is left, its seed ``planning.continuation_seed``; the text an
undisturbed run would still have held back (a partial stop string, a partial character)
is recomputed by replaying the tokens through the engine's ``decoder`` and sent first;
stop strings are then checked here, across the seam, and not by the library (which
sees only its own output); a resumed sequence that had already ended (its last token an end id, or no
length left) just finishes.  Usage counts the resumed tokens, as the client got them.

Response formats (``SamplingParams.constraint``: JSON, or JSON under a schema) are
compiled after the plan, off the event loop and under a deadline (``grammar.py``), so a
schema the grammar compiler refuses, or takes too long over, is a 400 before anything
runs.  Engines that sample token by token mask with ``matcher(plan)`` (``grammar.py``,
xgrammar), which has already followed a resumed generation's tokens; an engine whose
library holds the grammar itself (vLLM) has it start again from the prompt on a resume
(``_replayed``: the tokens already sent must come out again, which a greedy or seeded
generation does, and are dropped).  Engines with neither refuse response formats.

An adapter implements ``load``, ``close`` and ``stream`` (plus ``prompt_ids`` and
``decoder`` when it does not tokenise with a Hugging Face tokenizer).  Adapters that
sample token by token themselves start their ``Stopper`` from ``primed_decoder``.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import logging
from collections.abc import AsyncGenerator, Collection, Mapping, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

from cyllm import errors
from cyllm.worker.engines.grammar import PARAM as GRAMMAR_PARAM
from cyllm.worker.engines.grammar import Grammars, Matcher
from cyllm.worker.engines.planning import (
    Plan,
    SamplingDefaults,
    check_resumed,
    continuation_seed,
    plan_max_tokens,
)
from cyllm.worker.engines.prompt import prepare_prompt
from cyllm.worker.engines.sampling import OutputRules
from cyllm.worker.engines.text import Decoder, IncrementalDecoder, StopMatcher
from cyllm.worker.engines.types import (
    Constraint,
    EngineHealth,
    Event,
    Finished,
    GenerationRequest,
    ModelCard,
    SamplingParams,
    Started,
    Step,
    TextDelta,
    TokenLogprob,
)
from cyllm.worker.settings import ModelSpec

log = logging.getLogger(__name__)

# The longest prompt scored token by token (echo, prompt_logprobs): its logits are
# tokens x vocabulary (8k tokens of a 150k vocabulary: 2.4 GB in bfloat16).
SCORE_MAX_TOKENS = 4096
LONG_PROMPT_CHARS = 32_768  # planned on a thread beyond this (a hop costs ~0.1 ms)


def _prompt_chars(request: GenerationRequest) -> int:
    return (
        len(request.prompt or "")
        + len(request.tools)
        + sum(len(content) for _, content in request.messages or ())
    )


class AbstractEngine(abc.ABC):
    """Load, generate (async iterator of events), health, close.

    Engines that serve LoRA adapters on top of their base model override the three
    adapter methods; a request names its adapter in ``GenerationRequest.adapter``.
    """

    name: str = "abstract"
    spec: ModelSpec

    async def add_adapter(self, name: str, path: Path) -> None:
        """Register a PEFT-format LoRA folder under ``name`` (base weights stay loaded)."""
        raise errors.InvalidRequest(f"the {self.name} engine does not serve LoRA adapters")

    async def remove_adapter(self, name: str) -> None:
        raise errors.InvalidRequest(f"the {self.name} engine does not serve LoRA adapters")

    def adapters(self) -> list[str]:
        return []

    @property
    def adapters_need_restart(self) -> bool:
        """Whether this engine serves adapters only once started again with room for them
        (vLLM started without LoRA slots)."""
        return False

    async def embed(self, texts: Sequence[str], dimensions: int = 0) -> tuple[list[list[float]], int]:
        """One vector per text (the mean of the last hidden states over its tokens,
        L2-normalised; ``dimensions``: the first that many, normalised again) and the
        tokens read.  Engines that cannot say so by name."""
        raise errors.InvalidRequest(
            f"the {self.name} engine does not make embeddings; serve the model with the "
            "transformers engine (a second model spec of the same weights) for /v1/embeddings",
            param="model",
        )

    def check_adapter(self, request: GenerationRequest) -> None:
        """Refuse a request for an adapter this engine does not hold."""
        if request.adapter is not None and request.adapter not in self.adapters():
            raise errors.ModelNotFound(
                f"adapter {request.adapter!r} is not loaded on this engine", param="model"
            )

    @abc.abstractmethod
    async def load(self) -> ModelCard:
        """Load weights and warm up; return what the worker advertises."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncGenerator[Event, None]:
        """Stream events for ``request``; raise InvalidRequest before the first one."""

    @abc.abstractmethod
    def health(self) -> EngineHealth: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


class RequestTracker:
    """What is in flight and how many tokens came out: the progress signal the
    coordinator's health check reads from heartbeats."""

    def __init__(self) -> None:
        self.running = 0  # generations between Started and their end
        self.waiting = 0  # of the running ones, those the library has not started yet
        self.tokens_generated = 0

    def health(self, down: str) -> EngineHealth:
        return EngineHealth(not down, self.running, self.waiting, self.tokens_generated, down)


class Engine(AbstractEngine):
    """An adapter over one inference library; see the module docstring for the steps."""

    library = "the engine"  # how messages name the library
    # The library's finish reasons -> ours; anything else ends as "stop".
    finish_reasons: Mapping[str, str] = {"stop": "stop", "length": "length", "abort": "abort"}
    # False: the library is not given stop strings; the skeleton cuts the text itself.
    checks_stop_strings = True
    # False: the library holds a response format's grammar and its output penalties
    # itself and starts them at its first generated token, so a resumed generation that
    # has either is run again from its prompt and the tokens the client has are checked
    # and dropped (``_replayed``).
    continues_output_state = True
    # Whether the engine applies a request's output rules (penalties, logit bias,
    # min_tokens, ignore_eos); engines that do not refuse requests that set them.
    output_rules = False
    # Whether it reports tokens' log probabilities (``SamplingParams.logprobs``), and its
    # prompt's (``prompt_logprobs``: ``score_prompt``).
    gives_logprobs = False
    gives_prompt_logprobs = False

    # Set by load():
    context_length: int
    defaults: SamplingDefaults
    tokenizer: Any = None  # a Hugging Face tokenizer, for the default prompt_ids

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.tracker = RequestTracker()
        self._grammars: Grammars | None = None  # built for the first response format
        self._building_grammars = asyncio.Lock()

    # -- what an adapter implements ------------------------------------------------------

    @abc.abstractmethod
    def stream(self, plan: Plan) -> AsyncGenerator[Step, None]:
        """Run ``plan`` in the library.  Closing this iterator must stop the request
        there (in a ``finally``); the last Step carries a finish reason."""

    def down(self) -> str:
        """Why this engine cannot take a request now ('' when it can)."""
        return ""

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        return prepare_prompt(self.tokenizer, request)

    def decoder(self, plan: Plan) -> Decoder:
        """Text for the tokens generated after ``plan``'s prompt, as this engine sends it."""
        return IncrementalDecoder(self.tokenizer, plan.prompt)

    def primed_decoder(self, plan: Plan) -> Decoder:
        """A decoder for ``plan``'s new tokens that has already seen its resumed ones."""
        decoder = self.decoder(plan)
        for token in plan.resumed:
            decoder.push(token)
        return decoder

    def end_ids(self) -> Collection[int]:
        """Token ids that end a sequence."""
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return () if eos is None else (eos,)

    def vocab_size(self) -> int | None:
        return len(self.tokenizer) if self.tokenizer is not None else None

    # -- the skeleton --------------------------------------------------------------------

    async def compile_constraint(self, constraint: Constraint) -> Any:
        """``constraint`` compiled for this engine (InvalidRequest when it cannot be).
        Engines that sample token by token compile with xgrammar (``make_grammars()``)
        and mask with ``matcher(plan)``; an engine whose library constrains decoding
        itself overrides this."""
        grammars = await self.grammars()
        if grammars is None:
            raise errors.InvalidRequest(
                f"response_format {constraint.kind!r} is not supported by the {self.name} engine "
                f"serving {self.spec.id}",
                param=GRAMMAR_PARAM,
            )
        # a library that holds the grammar itself (continues_output_state False) compiles
        # it again: here the schema is only checked
        return await grammars.compile(constraint, keep=self.continues_output_state)

    def make_grammars(self) -> Grammars | None:
        """This engine's vocabulary for xgrammar; None: no constrained decoding.  Runs
        on a thread, once, for the first response format (reading a vocabulary takes
        a fifth of a second: no request without one pays it)."""
        return None

    async def grammars(self) -> Grammars | None:
        async with self._building_grammars:
            if self._grammars is None:
                self._grammars = await asyncio.to_thread(self.make_grammars)
                if self._grammars is not None:
                    self._grammars.timeout_s = self.spec.grammar_timeout_s
        return self._grammars

    def close_grammars(self) -> None:
        """Stop the grammar guard's process, if one was started (engines' ``close``)."""
        if self._grammars is not None:
            self._grammars.close()

    def matcher(self, plan: Plan) -> Matcher | None:
        """A grammar matcher for ``plan``'s sequence (past its resumed tokens), or None."""
        if plan.grammar is None or self._grammars is None:
            return None
        return self._grammars.matcher(plan.grammar, plan.resumed)

    def check_rules(self, sampling: SamplingParams) -> None:
        if sampling.prompt_logprobs is not None and not self.gives_prompt_logprobs:
            raise errors.InvalidRequest(
                f"prompt logprobs (echo, prompt_logprobs) are not supported by the {self.name} "
                f"engine serving {self.spec.id}",
                param="prompt_logprobs",
            )
        if sampling.max_tokens == 0 and sampling.prompt_logprobs is None:
            raise errors.InvalidRequest(
                "max_tokens 0 is for scoring a prompt (echo with logprobs)", param="max_tokens"
            )
        if sampling.logprobs is not None and not self.gives_logprobs:
            raise errors.InvalidRequest(
                f"logprobs are not supported by the {self.name} engine serving {self.spec.id}",
                param="logprobs",
            )
        rules = sampling.rules()
        if rules and not self.output_rules:
            raise errors.InvalidRequest(
                f"{rules[0]} is not supported by the {self.name} engine serving {self.spec.id}",
                param=rules[0],
            )
        vocab = self.vocab_size() if sampling.logit_bias else None
        bad = next((t for t, _ in sampling.logit_bias if t < 0 or (vocab and t >= vocab)), None)
        if bad is not None:
            raise errors.InvalidRequest(
                f"logit_bias names token id {bad}, outside the vocabulary (0..{vocab - 1 if vocab else '?'})",
                param="logit_bias",
            )
        if sampling.constraint is not None and (sampling.ignore_eos or sampling.min_tokens):
            raise errors.InvalidRequest(
                "ignore_eos and min_tokens cannot be combined with a "
                "response_format (the JSON ends where its grammar ends)",
                param="ignore_eos" if sampling.ignore_eos else "min_tokens",
            )

    def rules(self, plan: Plan) -> OutputRules | None:
        """The output rules of ``plan``'s sequence (having followed its resumed tokens),
        for engines that sample token by token; None when it sets none."""
        return OutputRules.of(plan.sampling, plan.prompt, self.end_ids(), plan.resumed)

    def plan(self, request: GenerationRequest) -> Plan:
        """Check ``request`` before anything runs (InvalidRequest naming the field)."""
        sampling = self.defaults.apply(request.sampling)
        prompt_ids = self.prompt_ids(request)
        max_new = plan_max_tokens(
            len(prompt_ids), sampling.max_tokens, self.context_length, self.spec.default_max_tokens
        )
        self.check_rules(sampling)
        if sampling.prompt_logprobs is not None and len(prompt_ids) > SCORE_MAX_TOKENS:
            raise errors.InvalidRequest(
                f"the prompt has {len(prompt_ids)} tokens; prompt logprobs are given for prompts of "
                f"up to {SCORE_MAX_TOKENS} tokens",
                param="prompt_logprobs",
            )
        vocab = self.vocab_size() if request.prompt_token_ids is not None else None
        if vocab is not None and any(t >= vocab for t in prompt_ids):
            raise errors.InvalidRequest(
                f"prompt: a token id is outside this model's vocabulary (0..{vocab - 1})", param="prompt"
            )
        resumed = request.resume.token_ids if request.resume is not None else ()
        if not resumed:
            return Plan(request, sampling, prompt_ids, max_new)
        check_resumed(resumed, max_new, self.vocab_size())
        sampling = dataclasses.replace(sampling, seed=continuation_seed(sampling.seed, len(resumed)))
        return Plan(
            request,
            sampling,
            prompt_ids + list(resumed),
            max_new - len(resumed),
            len(prompt_ids),
            tuple(resumed),
        )

    async def tokenize(self, request: GenerationRequest) -> tuple[list[int], list[str]]:
        """The prompt's token ids as a generation would see them, and their token strings
        (vLLM's /tokenize); a long prompt on a thread, as ``generate`` plans one."""

        def work() -> tuple[list[int], list[str]]:
            ids = self.prompt_ids(request)
            convert = getattr(self.tokenizer, "convert_ids_to_tokens", None)
            strs = convert(ids) if convert else [self.tokenizer.decode([i]) for i in ids]
            return ids, [str(t) for t in strs]

        return await asyncio.to_thread(work) if _prompt_chars(request) > LONG_PROMPT_CHARS else work()

    async def detokenize(self, ids: list[int]) -> str:
        vocab = self.vocab_size()
        bad = next((t for t in ids if t < 0 or (vocab is not None and t >= vocab)), None)
        if bad is not None:
            raise errors.InvalidRequest(
                f"tokens: id {bad} is outside the vocabulary (0..{(vocab or 0) - 1})", param="tokens"
            )
        return await asyncio.to_thread(self.tokenizer.decode, ids)

    async def score_prompt(self, plan: Plan) -> tuple[TokenLogprob, ...]:
        """Each prompt token's logprob under the model (and ``prompt_logprobs``
        alternatives), the first token's 0: engines with ``gives_prompt_logprobs``."""
        raise NotImplementedError

    def held_text(self, plan: Plan) -> str:
        """What an undisturbed run would have produced for the resumed tokens beyond the
        text the client got: text it was still holding back."""
        decoder = self.decoder(plan)
        produced = "".join(decoder.push(t) for t in plan.resumed)
        sent = plan.request.resume.text if plan.request.resume else ""
        if produced.startswith(sent):
            return produced[len(sent) :]
        log.warning(
            "request %s: the resumed tokens decode to text that does not begin with "
            "the text already sent; continuing without the held-back part",
            plan.request_id,
        )
        return ""

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Event, None]:
        if why := self.down():
            raise errors.EngineError(f"{self.library} engine for {self.spec.id} is down: {why}")
        self.check_adapter(request)
        # Tokenising takes the thread for the prompt's length (1 MB: a third of a second,
        # with the GIL released), so a long one is planned on a thread: on the event loop
        # it would hold up every stream of the worker.
        plan = (
            await asyncio.to_thread(self.plan, request)
            if _prompt_chars(request) > LONG_PROMPT_CHARS
            else self.plan(request)
        )
        if plan.sampling.constraint is not None:  # checked first: compiling costs the most
            plan = dataclasses.replace(plan, grammar=await self.compile_constraint(plan.sampling.constraint))
        rid, prompt_tokens, completion = request.request_id, plan.prompt_tokens, len(plan.resumed)
        matcher = None
        if plan.resumed or not self.checks_stop_strings:
            # Cut here, and only here: a library holding back its own partial matches
            # would hide text from this matcher and run past the stop.
            matcher = StopMatcher(plan.sampling.stop)
            plan = dataclasses.replace(plan, sampling=dataclasses.replace(plan.sampling, stop=()))
        self.tracker.running += 1
        try:
            scored = () if plan.sampling.prompt_logprobs is None else await self.score_prompt(plan)
            yield Started(prompt_tokens, scored)
            if plan.max_new == 0 and not plan.resumed:  # a prompt scored, nothing generated
                yield Finished("length", prompt_tokens, 0)
                return
            if plan.resumed:
                assert matcher is not None
                text, hit = matcher.push(self.held_text(plan))
                ended = (
                    "stop"
                    if hit or plan.resumed[-1] in self.end_ids()
                    else "length"
                    if plan.max_new == 0
                    else None
                )
                if ended is not None:
                    text += "" if hit else matcher.flush()
                if text:
                    yield TextDelta(text)
                if ended is not None:
                    yield Finished(ended, prompt_tokens, completion)
                    return
            steps_of = (
                self._replayed
                if plan.resumed
                and not self.continues_output_state
                and (
                    plan.grammar is not None
                    or plan.sampling.presence_penalty
                    or plan.sampling.frequency_penalty
                )
                else self.stream
            )
            async with aclosing(steps_of(plan)) as steps:
                async for step in steps:
                    completion += len(step.token_ids)
                    self.tracker.tokens_generated += len(step.token_ids)
                    text, reason = step.text, step.finish_reason
                    if matcher is not None:
                        text, hit = matcher.push(text)
                        if hit:
                            reason = "stop"
                        elif reason is not None:
                            text += matcher.flush()
                    if text or step.token_ids:
                        yield TextDelta(text, tuple(step.token_ids), step.logprobs)
                    if reason is not None:
                        yield Finished(self.finish_reasons.get(reason, "stop"), prompt_tokens, completion)
                        return
            raise errors.EngineError(f"{self.library} ended request {rid} without finishing it")
        except (errors.CyllmError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:  # the library's own exceptions, whatever their kind
            raise errors.EngineError(f"{self.library} failed on request {rid}: {exc}") from exc
        finally:
            self.tracker.running -= 1

    async def _replayed(self, plan: Plan) -> AsyncGenerator[Step, None]:
        """``plan``'s generation run again from its prompt with its original seed; the
        tokens it resumes must come out first (a greedy or seeded run repeats them) and
        are dropped; the text of the rest is decoded here, after them."""
        again = dataclasses.replace(
            plan,
            prompt_ids=plan.prompt,
            max_new=plan.max_new + len(plan.resumed),
            resumed=(),
            sampling=dataclasses.replace(plan.sampling, seed=plan.request.sampling.seed),
        )
        expected, decoder = list(plan.resumed), self.primed_decoder(plan)
        skip_logprobs = len(plan.resumed)  # the resumed tokens' come out again first
        async with aclosing(self.stream(again)) as steps:
            async for step in steps:
                ids, logprobs = list(step.token_ids), step.logprobs[skip_logprobs:]
                skip_logprobs = max(0, skip_logprobs - len(step.logprobs))
                while expected and ids:
                    if ids.pop(0) != expected.pop(0):
                        raise errors.EngineError(
                            f"{self.library} cannot continue request {plan.request_id} under its "
                            "response format: run again, it did not repeat the tokens already "
                            "sent (an unseeded sampled generation)"
                        )
                text = "".join(decoder.push(t) for t in ids)
                if step.finish_reason is not None:
                    text += decoder.flush()
                if text or ids or step.finish_reason is not None:
                    yield Step(text, tuple(ids), step.finish_reason, logprobs)

    def health(self) -> EngineHealth:
        return self.tracker.health(self.down())
