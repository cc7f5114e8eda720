"""The memory manager's estimates, against the default model's real files."""

from __future__ import annotations

from cyllm.worker import memory, model_files
from cyllm.worker.settings import DEFAULT_GGUF, ModelSpec
from tests.engines.conftest import default_folder

# SmolLM2-135M: 30 layers, 3 KV heads of 64 -> 2*30*3*64 = 11,520 values per token.
PER_TOKEN_VALUES = 11_520


def test_weights_come_from_the_safetensors_headers():
    elements, dtype = memory.safetensors_elements(default_folder())
    assert elements == 134_515_008 and dtype == "F32"


def test_transformers_estimate_counts_dtype_batch_and_sequence_length():
    spec = ModelSpec(id="m", path=default_folder(), max_batch_size=4, max_context=1000)
    cpu = memory.estimate_folder(spec, default_folder(), "cpu", 0)
    assert cpu.weights == 134_515_008 * 4  # float32 on CPU
    assert cpu.kv_cache == PER_TOKEN_VALUES * 4 * 1000 * 4  # capped at the context
    gpu = memory.estimate_folder(spec, default_folder(), "cuda", 0)
    assert gpu.weights == 134_515_008 * 2 and gpu.kv_cache == PER_TOKEN_VALUES * 2 * 1000 * 4
    long = spec.model_copy(update={"max_context": None, "default_max_tokens": 512})
    assert (
        memory.estimate_folder(long, default_folder(), "cpu", 0).kv_cache
        == PER_TOKEN_VALUES * 4 * (512 + 1024) * 4
    )


def test_vllm_estimate_is_its_reserved_pool():
    spec = ModelSpec(id="m", path=default_folder(), engine="vllm", engine_args={"cpu_kvcache_space_gib": 2})
    assert memory.estimate_folder(spec, default_folder(), "cpu", 0).kv_cache == 2 * memory.GIB
    on_gpu = memory.estimate_folder(
        spec.model_copy(update={"engine_args": {}}), default_folder(), "cuda", 100 * memory.GIB
    )
    assert on_gpu.total == int(0.9 * 100 * memory.GIB)


def test_gguf_estimate_is_the_file_and_its_context():
    gguf = model_files.gguf_path(DEFAULT_GGUF)
    spec = ModelSpec(
        id="g", gguf=DEFAULT_GGUF, engine="llama_cpp", max_context=2048, engine_args={"instances": 2}
    )
    est = memory.estimate_gguf(spec, gguf)
    assert est.weights == gguf.stat().st_size
    assert est.kv_cache == PER_TOKEN_VALUES * 2 * 2048 * 2  # f16, two instances


def test_budget_accounting():
    budget = memory.MemoryBudget("cpu", 1.0, 0.9)
    assert budget.limit == memory.GIB and budget.free_bytes() <= memory.GIB
    budget.used["a"] = memory.Estimate(300 * 2**20, 100 * 2**20)
    assert budget.used_bytes == 400 * 2**20
    assert budget.free_bytes() <= memory.GIB - 400 * 2**20
