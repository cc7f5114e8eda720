"""Prompt log-probabilities as evaluation harnesses read them: ``echo`` with
``logprobs`` (and ``max_tokens: 0``) on /v1/completions, prompts as token ids, vLLM's
``prompt_logprobs`` on chat and completions; the values agree with transformers run
directly on the same model; and lm-evaluation-harness's ``local-completions`` model
scores a multiple-choice task through the server."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest
import torch

from cyllm.worker.devices import cpu_has_bfloat16
from tests.e2e.conftest import MODEL

TEXT = "The capital of France is Paris."


# The server's engine serves in bfloat16 where the CPU computes it natively, else in
# float32 (its dtype "auto"); the reference runs in the same precision, and agrees within
# what that precision allows (bfloat16 keeps 8 bits of mantissa: batch shapes and kernel
# order move a logprob by a few hundredths).
SERVED = torch.bfloat16 if cpu_has_bfloat16() else torch.float32
TOLERANCE = 0.1 if SERVED == torch.bfloat16 else 1e-3


@pytest.fixture(scope="module")
def direct(default_model_dir):
    """The model and tokenizer as transformers loads them, in the precision served."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=SERVED)
    return model.eval(), tok


def _reference(direct, ids: list[int]) -> list[float]:
    model, _ = direct
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    return [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def test_echo_scores_the_prompt_as_transformers_does(client, direct):
    _, tok = direct
    ids = tok(TEXT)["input_ids"]
    reply = client.completions.create(model=MODEL, prompt=TEXT, echo=True, logprobs=2, max_tokens=0)
    choice = reply.choices[0]
    assert choice.text == TEXT and choice.finish_reason == "length" and reply.usage.completion_tokens == 0
    lp = choice.logprobs
    assert "".join(lp.tokens) == TEXT and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[0] == 0 and lp.text_offset[-1] == len(TEXT) - len(lp.tokens[-1])
    want = _reference(direct, ids)
    assert all(abs(a - b) < TOLERANCE for a, b in zip(lp.token_logprobs[1:], want)), (lp.token_logprobs, want)
    assert all(
        len(top) <= 2 and max(top.values()) >= v - TOLERANCE for top, v in zip(lp.top_logprobs[1:], want)
    )
    # token ids in, as the harness sends them; and a continuation after the echo
    again = client.completions.create(
        model=MODEL, prompt=ids, echo=True, logprobs=0, max_tokens=3, temperature=0
    )
    choice = again.choices[0]
    assert choice.text.startswith(TEXT) and len(choice.logprobs.tokens) == len(ids) + 3
    assert all(abs(a - b) < TOLERANCE for a, b in zip(choice.logprobs.token_logprobs[1 : len(ids)], want))
    streamed = list(
        client.completions.create(
            model=MODEL, prompt=TEXT, echo=True, max_tokens=3, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices).startswith(TEXT)


def test_vllms_prompt_logprobs_on_chat_and_completions(server, direct):
    _, tok = direct
    body = {"model": MODEL, "prompt": TEXT, "max_tokens": 1, "prompt_logprobs": 1, "temperature": 0}
    r = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    scored = r.json()["choices"][0]["prompt_logprobs"]
    ids = tok(TEXT)["input_ids"]
    assert scored[0] is None and len(scored) == len(ids)
    for entry, token, want in zip(scored[1:], ids[1:], _reference(direct, ids)):
        assert abs(entry[str(token)]["logprob"] - want) < TOLERANCE
        assert any(e["rank"] == 1 for e in entry.values())
    chat = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        "prompt_logprobs": 0,
    }
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 200, r.text
    found = r.json()["prompt_logprobs"]
    assert found[0] is None and all(isinstance(e, dict) and e for e in found[1:])
    assert r.json()["usage"]["prompt_tokens"] == len(found)


def test_bad_prompts_are_refused_by_name(server):
    cases = [
        ({"prompt": [999_999_999], "max_tokens": 1}, "outside the vocabulary"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens 0 scores a prompt"),
        ({"prompt": "hi", "suffix": "x"}, "suffix is not supported"),
        ({"prompt": [[1, 2], [3]], "max_tokens": 1}, "only one prompt per request"),
        (
            {"prompt": "hi", "max_tokens": 1, "prompt_logprobs": 1, "stream": True},
            "not available when stream",
        ),
    ]
    for extra, says in cases:
        r = httpx.post(f"{server.base_url}/v1/completions", json={"model": MODEL, **extra}, timeout=60)
        assert r.status_code == 400 and says in r.json()["error"]["message"], (extra, r.text)


def test_lm_evaluation_harness_scores_a_task_through_the_server(server, default_model_dir, tmp_path):
    """The harness's own OpenAI-compatible model, as its docs show, on a local task."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    data = tmp_path / "capitals.jsonl"
    rows = [
        ("The capital of France is", [" Paris", " Tokyo", " Lima"], 0),
        ("The capital of Japan is", [" Berlin", " Tokyo", " Rome"], 1),
        ("The capital of Italy is", [" Oslo", " Cairo", " Rome"], 2),
    ]
    data.write_text("".join(json.dumps({"q": q, "choices": c, "answer": a}) + "\n" for q, c, a in rows))
    (tmp_path / "capitals.yaml").write_text(
        "task: capitals\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    # A generation task too: the harness sends the prompt with its stop strings.
    (tmp_path / "capitals_gen.yaml").write_text(
        "task: capitals_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: generate_until\n"
        'doc_to_text: "Q: What city is meant? {{q}}\\nA:"\n'
        'doc_to_target: "{{choices[answer]}}"\n'
        'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 8\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "    ignore_case: true\n    ignore_punctuation: true\n"
    )
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "model": MODEL,
            "base_url": f"{server.base_url}/v1/completions",
            "tokenizer": str(default_model_dir),
            "tokenized_requests": True,
            "num_concurrent": 1,
            "max_retries": 1,
        },
        tasks=["capitals", "capitals_gen"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    acc = out["results"]["capitals"]["acc,none"]
    assert acc == 1.0 and not math.isnan(acc), out["results"]
    answers = [s["resps"][0][0] for s in out["samples"]["capitals_gen"]]
    assert len(answers) == 3 and any("Paris" in a for a in answers), answers
    assert "exact_match,none" in out["results"]["capitals_gen"]


def test_tokenize_and_detokenize_as_vllm_serves_them(server, client, direct):
    _, tok = direct
    r = httpx.post(
        f"{server.base_url}/tokenize",
        json={"model": MODEL, "prompt": TEXT, "return_token_strs": True},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    found = r.json()
    assert found["tokens"] == tok(TEXT)["input_ids"] and found["count"] == len(found["tokens"])
    assert found["token_strs"] == tok.convert_ids_to_tokens(found["tokens"])
    listed = {m.id: m for m in client.models.list()}
    assert found["max_model_len"] == listed[MODEL].model_extra["max_model_len"] > 0
    chat = [{"role": "user", "content": "Hi there"}]
    r = httpx.post(f"{server.base_url}/tokenize", json={"model": MODEL, "messages": chat}, timeout=60)
    want = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    assert r.json()["tokens"] == list(want) and r.json()["token_strs"] is None
    r = httpx.post(
        f"{server.base_url}/detokenize", json={"model": MODEL, "tokens": found["tokens"]}, timeout=60
    )
    assert r.status_code == 200 and r.json() == {"prompt": TEXT}
    for path, body, says in [
        ("/detokenize", {"model": MODEL, "tokens": [10**9]}, "outside the vocabulary"),
        ("/tokenize", {"model": MODEL}, "exactly one of prompt and messages"),
        ("/tokenize", {"model": "nope", "prompt": "x"}, "nope"),
    ]:
        r = httpx.post(f"{server.base_url}{path}", json=body, timeout=60)
        assert r.status_code in (400, 404) and says in r.json()["error"]["message"], (path, r.text)
