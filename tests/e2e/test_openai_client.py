"""The official openai client against the running server."""

from __future__ import annotations

import openai
import pytest

from tests.e2e.conftest import MODEL

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def test_models_list_has_the_default_model(client):
    assert MODEL in [m.id for m in client.models.list()]


def test_chat_completion_answers_paris(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"
    assert reply.usage.prompt_tokens > 10
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_completion_stream_answers_paris(client):
    # max_tokens differs from the test above: not its cached answer, which (all there at
    # once) may come back as one delta
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens >= 2
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2  # streamed


def test_max_tokens_and_stop_are_honoured(client):
    long = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        max_tokens=7,
        temperature=0,
    )
    assert long.choices[0].finish_reason == "length"
    assert long.usage.completion_tokens == 7
    cut = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=20, temperature=0, stop=["Paris"]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert "Paris" not in cut.choices[0].message.content
    assert cut.choices[0].message.content.startswith("The capital of France")


def test_seeded_sampling_is_reproducible(client):
    args = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Name an animal."}],
        max_tokens=12,
        temperature=1.0,
        seed=1234,
    )
    a = client.chat.completions.create(**args).choices[0].message.content
    b = client.chat.completions.create(**args).choices[0].message.content
    assert a == b and a


def test_text_completion(client):
    reply = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert reply.choices[0].text.strip()
    assert reply.usage.completion_tokens <= 5


def test_errors_reach_the_client_typed(client):
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    assert "no-such-model" in nf.value.message
    with pytest.raises(openai.BadRequestError) as br:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=100_000)
    assert "maximum context length is 8192" in br.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="word " * 9000, max_tokens=1)
    # and the server still answers
    assert client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3).choices


def test_penalties_logit_bias_and_vllm_extras(client):
    reply = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0, logit_bias={"42": 100}
    )
    text = reply.choices[0].text  # one token, three times
    assert reply.usage.completion_tokens == 3 and text == text[: len(text) // 3] * 3, text
    plain = (
        client.completions.create(model=MODEL, prompt="1, 1, 1, 1, 1, 1,", max_tokens=12, temperature=0)
        .choices[0]
        .text
    )
    ruled = (
        client.completions.create(
            model=MODEL,
            prompt="1, 1, 1, 1, 1, 1,",
            max_tokens=12,
            temperature=0,
            frequency_penalty=1.5,
            presence_penalty=0.5,
            extra_body={"repetition_penalty": 3.0},
        )
        .choices[0]
        .text
    )
    assert ruled.count("1") < plain.count("1"), (plain, ruled)
    long = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=40, temperature=0, extra_body={"ignore_eos": True}
    )
    assert (long.choices[0].finish_reason, long.usage.completion_tokens) == ("length", 40)
    for bad, param in (
        ({"logit_bias": {"x1": 5}}, "logit_bias"),
        ({"logit_bias": {"1": 500}}, "logit_bias"),
        ({"logit_bias": {"99999999": 5}}, "logit_bias"),
        ({"presence_penalty": 3}, "presence_penalty"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3, **bad)
        assert param in refused.value.message or refused.value.body.get("param") == param


def test_n_choices(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=12, n=3, temperature=1.0, seed=5
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.message.content for c in reply.choices)
    completion = sum(len(c.message.content) > 0 for c in reply.choices)
    assert completion == 3 and reply.usage.completion_tokens <= 36
    again = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=12, n=3, temperature=1.0, seed=5
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]
    # the prompt counts once, as OpenAI counts it
    one = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1)
    assert reply.usage.prompt_tokens == one.usage.prompt_tokens
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="Once upon a time",
            max_tokens=8,
            n=2,
            temperature=1.0,
            seed=1,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = {0: "", 1: ""}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.text
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert sorted(finishes) == ["length", "length"] and all(texts.values())
    assert chunks[-1].usage.completion_tokens == 16
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=QUESTION, n=17)


def test_logprobs_on_chat_and_completions(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content
    assert "".join(e.token for e in content) == reply.choices[0].message.content
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        assert bytes(e.bytes).decode() == e.token
    legacy = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2
    ).choices[0]
    lp = legacy.logprobs
    assert "".join(lp.tokens) == legacy.text and len(lp.token_logprobs) == 4
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    assert all(len(top) == 2 and max(top.values()) <= 0 for top in lp.top_logprobs)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=6, temperature=0, logprobs=True, stream=True
        )
    )
    streamed = [
        e.token for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert "".join(streamed) == reply.choices[0].message.content
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=QUESTION, top_logprobs=2)
