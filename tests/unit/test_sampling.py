import torch

from cyllm.worker.engines.sampling import make_generator, sample
from cyllm.worker.engines.types import SamplingParams


def logits():
    torch.manual_seed(0)
    return torch.randn(3, 50)


def test_greedy_rows_take_the_argmax():
    lg = logits()
    params = [SamplingParams(temperature=0.0, top_p=1.0)] * 3
    gens = [make_generator(p, torch.device("cpu")) for p in params]
    assert sample(lg, params, gens) == lg.argmax(-1).tolist()


def test_a_fixed_seed_reproduces_the_same_tokens():
    lg = logits()
    p = SamplingParams(temperature=1.0, top_p=1.0, seed=42)
    runs = []
    for _ in range(2):
        gen = make_generator(p, torch.device("cpu"))
        runs.append([sample(lg, [p] * 3, [gen] * 3) for _ in range(5)])
    assert runs[0] == runs[1]


def test_tiny_top_p_keeps_only_the_most_likely_token():
    lg = logits()
    p = SamplingParams(temperature=1.5, top_p=1e-6)
    gen = make_generator(p, torch.device("cpu"))
    for _ in range(5):
        assert sample(lg, [p] * 3, [gen] * 3) == lg.argmax(-1).tolist()


def test_bfloat16_is_the_cpu_default_only_where_the_cpu_computes_it():
    from cyllm.worker.devices import cpu_has_bfloat16

    assert cpu_has_bfloat16("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile")
    assert cpu_has_bfloat16("Features\t: fp asimd bf16 i8mm")  # Arm
    assert not cpu_has_bfloat16("flags\t\t: fpu sse2 avx2 avx512f avx512bw")
    assert not cpu_has_bfloat16("")
