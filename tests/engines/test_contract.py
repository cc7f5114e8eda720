"""The engine contract, run once for every engine (see conftest for which are real)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from contextlib import aclosing

import jsonschema
import pytest

from cyllm import errors
from cyllm.worker.engines.types import (
    Constraint,
    Finished,
    GenerationRequest,
    Resume,
    SamplingParams,
    Started,
    TextDelta,
)
from tests.engines.conftest import CONTEXT
from tests.polling import returns, until

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a",
    "1, 2, 3, 4,",
    "The best way to learn to code is",
]


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
    assert all(isinstance(e, TextDelta) and (e.text or e.token_ids) for e in events[1:-1])
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
    alone = [
        (await collect(subject.engine, raw(f"a{i}", p, max_tokens=12)))[1:] for i, p in enumerate(PROMPTS)
    ]
    peak = 0

    async def watch():
        nonlocal peak
        while True:
            peak = max(peak, subject.engine.health().running)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    together = await asyncio.gather(
        *(collect(subject.engine, raw(f"c{i}", p, max_tokens=12)) for i, p in enumerate(PROMPTS))
    )
    watcher.cancel()
    assert peak >= 2
    assert all(done.finish_reason in ("stop", "length") for _, _, done in together)
    if subject.deterministic_batching:
        assert [t for _, t, _ in together] == [t for t, _ in alone]
    else:  # same lengths and a shared start: the same model, not garbage
        assert [d.completion_tokens for _, _, d in together] == [d.completion_tokens for _, d in alone]
        assert all(t[:8] == a[:8] for (_, t, _), (a, _) in zip(together, alone))


async def _idle(engine, timeout: float = 10.0) -> None:
    await until(
        lambda: returns(engine.health().running),
        lambda n: n == 0,
        timeout=timeout,
        what="the engine to have nothing running",
    )


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


@pytest.mark.parametrize(
    "request_, error, param",
    [
        (GenerationRequest("e1", prompt=""), errors.InvalidRequest, "prompt"),
        (GenerationRequest("e2", messages=()), errors.InvalidRequest, "messages"),
        (raw("e3", "hi", temperature=3.0), errors.InvalidRequest, "temperature"),
        (raw("e4", "hi", max_tokens=CONTEXT + 1), errors.ContextLengthExceeded, "max_tokens"),
        (raw("e5", "hello " * (CONTEXT * 2)), errors.ContextLengthExceeded, "messages"),
    ],
    ids=["empty-prompt", "empty-messages", "temperature", "max-tokens", "prompt-too-long"],
)
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


# -- resuming: a generation cut off after any delta continues exactly -------------------


def resumed(request: GenerationRequest, deltas: list[TextDelta], rid: str) -> GenerationRequest:
    """``request`` continued after the client got ``deltas``."""
    ids = tuple(t for d in deltas for t in d.token_ids)
    return dataclasses.replace(request, request_id=rid, resume=Resume(ids, "".join(d.text for d in deltas)))


async def check_every_seam(engine, request: GenerationRequest, cuts=None) -> tuple[str, Finished]:
    events, full, done = await collect(engine, request)
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert all(d.token_ids for d in deltas[:-1]) or not deltas
    for k in cuts or range(1, len(deltas) + 1):  # after the last delta: Finished was lost
        before = deltas[:k]
        events2, rest, done2 = await collect(engine, resumed(request, before, f"{request.request_id}-{k}"))
        seam = f"cut after delta {k}: {''.join(d.text for d in before)!r} + {rest!r}"
        assert "".join(d.text for d in before) + rest == full, seam
        assert (done2.finish_reason, done2.completion_tokens, done2.prompt_tokens) == (
            done.finish_reason,
            done.completion_tokens,
            done.prompt_tokens,
        ), seam
        assert events2[0].prompt_tokens == done.prompt_tokens
    return full, done


async def test_a_resumed_generation_continues_exactly_as_an_undisturbed_one(subject):
    full, done = await check_every_seam(subject.engine, raw("rs", PROMPTS[1], max_tokens=12))
    assert done.finish_reason == "length" and full


async def test_a_stop_string_across_the_seam_is_found(subject):
    _, full, _ = await collect(subject.engine, raw("sa", PROMPTS[3], max_tokens=16))
    words = full.split(" ")
    assert len(words) > 5, full
    stop = f"{words[3][-2:]} {words[4][:2]}"  # spans the boundary of two words, so of tokens
    text, done = await check_every_seam(subject.engine, raw("sb", PROMPTS[3], max_tokens=16, stop=(stop,)))
    assert done.finish_reason == "stop" and text == full[: full.index(stop)]


async def test_a_resumed_sequence_that_had_ended_just_finishes(subject):
    ends = list(subject.engine.end_ids()) if hasattr(subject.engine, "end_ids") else []
    if not ends:
        pytest.skip("this engine has no end-of-sequence token")
    events, _, _ = await collect(subject.engine, raw("eo", PROMPTS[0], max_tokens=4))
    deltas = [e for e in events if isinstance(e, TextDelta)]
    ids = tuple(t for d in deltas for t in d.token_ids) + (ends[0],)
    request = dataclasses.replace(
        raw("eo2", PROMPTS[0], max_tokens=12), resume=Resume(ids, "".join(d.text for d in deltas))
    )
    events2, rest, done = await collect(subject.engine, request)
    assert (rest, done.finish_reason, done.completion_tokens) == ("", "stop", len(ids))


async def test_a_seeded_resumed_generation_is_reproducible(subject):
    if subject.kind not in ("transformers", "vllm", "llama_cpp"):
        pytest.skip("this engine's test double does not sample")
    request = raw("sd", PROMPTS[1], max_tokens=10, temperature=1.0, seed=7)
    events, _, _ = await collect(subject.engine, request)
    deltas = [e for e in events if isinstance(e, TextDelta)][:3]
    texts = {(await collect(subject.engine, resumed(request, deltas, f"sd{i}")))[1] for i in range(2)}
    assert len(texts) == 1, texts


@pytest.mark.parametrize("ids", [(-1,), (10**9,)], ids=["negative", "beyond-vocabulary"])
async def test_resume_tokens_outside_the_vocabulary_are_refused(subject, ids):
    if subject.kind in ("fake", "hybrid") and ids[0] > 0:
        pytest.skip("the fake has no vocabulary")
    request = dataclasses.replace(raw("rv", PROMPTS[0], max_tokens=4), resume=Resume(ids, ""))
    with pytest.raises(errors.InvalidRequest) as info:
        await anext(aiter(subject.engine.generate(request)))
    assert info.value.param == "resume"


# -- response formats: JSON under a grammar --------------------------------------------

# Engines that decode under a grammar: xgrammar's matcher in the skeleton (transformers,
# llama.cpp) or the library's own structured outputs (vLLM); the others refuse.
CONSTRAINED = ("transformers", "vllm", "llama_cpp")
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "languages": {
            "type": "array",
            "items": {"enum": ["English", "French", "Spanish"]},
            "minItems": 1,
            "maxItems": 2,
        },
        "email": {"anyOf": [{"type": "string", "maxLength": 40}, {"type": "null"}]},
    },
    "required": ["name", "age", "languages", "email"],
}


def shaped(
    rid: str, schema: dict | None, ask: str = "Describe a French teacher as JSON.", **sampling
) -> GenerationRequest:
    """A chat asking for JSON, under ``schema`` (None: any JSON object)."""
    c = Constraint("json_object") if schema is None else Constraint("json_schema", json.dumps(schema))
    return GenerationRequest(
        rid,
        messages=(("user", ask),),
        sampling=SamplingParams(**{"temperature": 0.0, "max_tokens": 96, "constraint": c, **sampling}),
    )


async def test_a_response_format_holds_the_output_to_its_schema(subject):
    if subject.kind not in CONSTRAINED:
        with pytest.raises(errors.InvalidRequest) as info:
            await anext(aiter(subject.engine.generate(shaped("rf", PERSON))))
        assert info.value.param == "response_format"
        return
    _, text, done = await collect(subject.engine, shaped("rf", PERSON))
    assert done.finish_reason == "stop", text
    jsonschema.validate(json.loads(text), PERSON)
    _, text, done = await collect(
        subject.engine,
        shaped("ro", None, 'Answer with a JSON object whose only key is "answer": what is 2 + 2?'),
    )
    assert done.finish_reason == "stop" and isinstance(json.loads(text), dict), text
    # Sampled, several seeds: whatever the model picks, a finished output validates.
    for seed in range(3):
        _, text, done = await collect(subject.engine, shaped(f"rs{seed}", PERSON, temperature=1.0, seed=seed))
        if done.finish_reason == "stop":
            jsonschema.validate(json.loads(text), PERSON)


async def test_a_response_format_cut_by_max_tokens_says_length(subject):
    if subject.kind not in CONSTRAINED:
        pytest.skip("this engine refuses response formats")
    _, text, done = await collect(subject.engine, shaped("rl", PERSON, max_tokens=5))
    assert done.finish_reason == "length" and done.completion_tokens == 5, text


async def test_a_constrained_generation_resumes_under_its_grammar(subject):
    if subject.kind not in CONSTRAINED:
        pytest.skip("this engine refuses response formats")
    text, done = await check_every_seam(subject.engine, shaped("rr", PERSON), cuts=[1, 4, 9])
    assert done.finish_reason == "stop"
    jsonschema.validate(json.loads(text), PERSON)


async def test_a_schema_the_grammar_compiler_refuses_is_a_bad_request(subject):
    if subject.kind not in CONSTRAINED:
        pytest.skip("this engine refuses response formats")
    bad = {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}
    with pytest.raises(errors.InvalidRequest, match="missing") as info:
        await anext(aiter(subject.engine.generate(shaped("rb", bad))))
    assert info.value.param == "response_format"


# -- output rules: penalties, logit bias, min_tokens, ignore_eos ------------------------

RULED = ("transformers", "vllm", "llama_cpp")


def chat(rid: str, ask: str, **sampling) -> GenerationRequest:
    return GenerationRequest(
        rid, messages=(("user", ask),), sampling=SamplingParams(**{"temperature": 0.0, **sampling})
    )


async def test_output_rules_are_applied_or_refused_by_name(subject):
    if subject.kind not in RULED:
        with pytest.raises(errors.InvalidRequest) as info:
            await anext(aiter(subject.engine.generate(chat("or", "hi", presence_penalty=1.0))))
        assert info.value.param == "presence_penalty"
        return
    engine = subject.engine
    # logit_bias: a token pushed to +100 is what greedy decoding picks, every time
    events, _, _ = await collect(engine, raw("lb", PROMPTS[0], max_tokens=3, logit_bias=((42, 100.0),)))
    assert [t for e in events if isinstance(e, TextDelta) for t in e.token_ids] == [42, 42, 42]
    # ignore_eos and min_tokens: an answer that ends early runs to its floor / its length
    _, _, short = await collect(engine, chat("se", "Say hi.", max_tokens=64))
    assert short.finish_reason == "stop" and short.completion_tokens < 50, short
    least = short.completion_tokens + 6
    _, _, floor = await collect(engine, chat("mt", "Say hi.", max_tokens=64, min_tokens=least))
    assert floor.completion_tokens >= least
    _, _, long = await collect(engine, chat("ie", "Say hi.", max_tokens=64, ignore_eos=True))
    assert (long.finish_reason, long.completion_tokens) == ("length", 64)
    # penalties: a repeating continuation repeats less
    _, plain, _ = await collect(engine, raw("rp0", "1, 1, 1, 1, 1, 1,", max_tokens=12))
    _, ruled, _ = await collect(
        engine, raw("rp1", "1, 1, 1, 1, 1, 1,", max_tokens=12, repetition_penalty=3.0, frequency_penalty=1.5)
    )
    assert ruled != plain and ruled.count("1") < plain.count("1"), (plain, ruled)


async def test_a_generation_with_penalties_resumes_exactly(subject):
    if subject.kind not in RULED:
        pytest.skip("this engine refuses output rules")
    await check_every_seam(
        subject.engine,
        raw("rq", PROMPTS[1], max_tokens=12, frequency_penalty=1.0, presence_penalty=0.5),
        cuts=[1, 3, 6],
    )


async def test_a_logit_bias_outside_the_vocabulary_is_refused(subject):
    if subject.kind not in RULED:
        pytest.skip("this engine refuses output rules")
    with pytest.raises(errors.InvalidRequest) as info:
        await anext(aiter(subject.engine.generate(raw("lv", PROMPTS[0], logit_bias=((10**8, 5.0),)))))
    assert info.value.param == "logit_bias"


# -- logprobs ----------------------------------------------------------------------------


async def test_logprobs_come_with_their_tokens_or_are_refused_by_name(subject):
    if subject.kind not in RULED:
        with pytest.raises(errors.InvalidRequest) as info:
            await anext(aiter(subject.engine.generate(raw("lp", PROMPTS[0], logprobs=2))))
        assert info.value.param == "logprobs"
        return
    events, text, done = await collect(subject.engine, raw("lp", PROMPTS[0], max_tokens=8, logprobs=2))
    deltas = [e for e in events if isinstance(e, TextDelta)]
    logprobs = [lp for d in deltas for lp in d.logprobs]
    ends = set(subject.engine.end_ids())
    assert [lp.token_id for lp in logprobs] == [t for d in deltas for t in d.token_ids if t not in ends]
    assert len(logprobs) == done.completion_tokens - (done.finish_reason == "stop")
    for lp in logprobs:
        assert lp.logprob <= 0 and len(lp.top) == 2 and all(v <= 0 for _, v, _ in lp.top)
        assert lp.top[0][0] == lp.token_id  # greedy: the chosen one is the likeliest
        assert lp.top[0][1] >= lp.top[1][1]
    assert "".join(lp.token for lp in logprobs).strip() == text.strip()
    unasked, _, _ = await collect(subject.engine, raw("lp1", PROMPTS[0], max_tokens=4))
    assert not any(e.logprobs for e in unasked if isinstance(e, TextDelta))


SCORES_PROMPTS = {"transformers", "vllm"}  # the others refuse by name


async def test_a_prompt_is_scored_or_refused_by_name(subject):
    """``prompt_logprobs``: each prompt token's logprob in Started (the first 0: nothing
    comes before it); with max_tokens 0 nothing is generated.  The greedy first token
    of the generation that follows is the prompt's likeliest continuation."""
    if subject.kind not in SCORES_PROMPTS:
        with pytest.raises(errors.InvalidRequest) as info:
            await anext(aiter(subject.engine.generate(raw("pl", PROMPTS[0], prompt_logprobs=1))))
        assert info.value.param == "prompt_logprobs"
        return
    events, text, done = await collect(subject.engine, raw("pl", PROMPTS[0], max_tokens=0, prompt_logprobs=2))
    started = events[0]
    assert isinstance(started, Started) and len(started.prompt_logprobs) == started.prompt_tokens
    assert (text, done.finish_reason, done.completion_tokens) == ("", "length", 0)
    first, *rest = started.prompt_logprobs
    assert first.logprob == 0.0 and rest
    assert "".join(lp.token for lp in started.prompt_logprobs).strip() == PROMPTS[0]
    for lp in rest:
        assert lp.logprob <= 0 and len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1]
        listed = {i for i, _, _ in lp.top}
        assert lp.token_id in listed or lp.logprob <= lp.top[1][1] + 1e-3  # below the top two
    with pytest.raises(errors.InvalidRequest) as info:
        await anext(aiter(subject.engine.generate(raw("pl0", PROMPTS[0], max_tokens=0))))
    assert info.value.param == "max_tokens"


# -- embeddings --------------------------------------------------------------------------


EMBEDS = {"transformers", "vllm", "llama_cpp"}  # the others refuse by name


async def test_embeddings_are_pooled_and_normalised_or_refused_by_name(subject):
    texts = [
        "The cat sat on the mat.",
        "A cat was sitting on the mat.",
        "Quarterly revenue grew by ten percent.",
    ]
    if subject.kind not in EMBEDS:
        with pytest.raises(errors.InvalidRequest) as info:
            await subject.engine.embed(texts)
        assert info.value.param == "model"
        return
    vectors, tokens = await subject.engine.embed(texts)
    assert len(vectors) == 3 and tokens > 12
    assert all(abs(sum(x * x for x in v) - 1) < 1e-3 for v in vectors)
    cos = [sum(a * b for a, b in zip(vectors[0], v)) for v in vectors[1:]]
    assert cos[0] > cos[1], cos  # the paraphrase is closer than the unrelated sentence
    (alone,), _ = await subject.engine.embed(texts[2:])
    assert max(abs(a - b) for a, b in zip(alone, vectors[2])) < 2e-2  # batched ≈ alone
    (short,), _ = await subject.engine.embed(texts[:1], dimensions=32)
    assert len(short) == 32 and abs(sum(x * x for x in short) - 1) < 1e-3
    with pytest.raises(errors.InvalidRequest) as info:
        await subject.engine.embed(texts[:1], dimensions=1 << 20)
    assert info.value.param == "dimensions"
    with pytest.raises(errors.InvalidRequest) as info:
        await subject.engine.embed(["ok", ""])
    assert info.value.param == "input" and "input 1" in info.value.message
