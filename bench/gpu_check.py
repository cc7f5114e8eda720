"""GPU check, in one go on a CUDA machine with no network: the transformers engine serving
a SmolLM2-135M-shaped and a Llama-3-8B-shaped model (random weights built from a config;
a byte-level tokenizer built here) at 1, 32 and 256 concurrent streams, next to plain
padded ``model.generate`` at the same batch in the same process.  Prints tokens/s and
median time to first token.  EOS is ignored so every stream makes exactly
``--max-tokens`` tokens.

    python bench/gpu_check.py [--shapes smollm2-135m llama3-8b] [--streams 1 32 256]
                              [--max-tokens 128] [--device cuda]

Reference (plain generate on an H200, from the engines issue): SmolLM2-135M shape 1,560
tok/s at batch 32 and 10,100 at 256; Llama-3-8B shape 1,040 / 4,350 at 32 / 128.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import print_table
from bench.throughput import run_engine, tagged
from cyllm.worker.engines.transformers_engine import TransformersEngine
from cyllm.worker.settings import ModelSpec

SHAPES = {
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    "llama3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        rope_theta=500000.0,
    ),
}


def byte_tokenizer(vocab_size: int):
    """A byte-level tokenizer (ids 0-255 are bytes; every other id decodes as ``t<id>``, so
    whatever a random model emits is text) with a chat template; no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {"<s>": 256, "</s>": 257, "<pad>": 258}
    vocab |= {f"t{i}": i for i in range(259, vocab_size)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return fast


class RandomWeightsEngine(TransformersEngine):
    """The transformers engine, with weights drawn from a config instead of read."""

    def __init__(self, spec: ModelSpec, config) -> None:
        super().__init__(spec, Path("/nonexistent"))
        self.config = config

    def load_tokenizer(self):
        return byte_tokenizer(self.config.vocab_size)

    def load_weights(self, dtype: torch.dtype) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        with torch.device(self.pick_device()):
            return AutoModelForCausalLM.from_config(self.config, dtype=dtype)


def run_generate(engine, n: int, max_tokens: int) -> float:
    tok = engine.tokenizer
    tok.padding_side = "left"
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in tagged(n)
    ]
    enc = tok(texts, return_tensors="pt", padding=True).to(engine.device)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    engine.model.generate(
        **enc,
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    sync()
    return n * max_tokens / (time.perf_counter() - start)


async def check(shape: str, streams: list[int], max_tokens: int, device: str) -> list[list]:
    from transformers import LlamaConfig

    config = LlamaConfig(**SHAPES[shape], bos_token_id=256, eos_token_id=257, pad_token_id=258)
    spec = ModelSpec(
        id=shape,
        path=Path("/nonexistent"),
        device=device,
        dtype="bfloat16",
        max_batch_size=max(streams),
        max_context=4096,
        temperature=0.0,
    )
    engine = RandomWeightsEngine(spec, config)
    t0 = time.perf_counter()
    await engine.load()
    print(
        f"{shape}: {sum(p.numel() for p in engine.model.parameters()) / 1e9:.2f}B parameters "
        f"on {engine.device}, loaded in {time.perf_counter() - t0:.0f}s",
        flush=True,
    )
    engine.eos_ids = set()  # random weights: never stop early
    rows = []
    try:
        for n in streams:
            # on the engine's own thread, as the engine computes (compute_thread: why)
            gen = await engine.on_engine_thread(functools.partial(run_generate, engine, n, max_tokens))
            eng, ttft = await run_engine(engine, n, max_tokens)
            rows.append([shape, n, gen, eng, f"{eng / gen:.2f}x", f"{ttft * 1000:.0f}"])
            print(
                f"  {n:>4} streams: generate {gen:9.1f}  engine {eng:9.1f} tok/s  TTFT {ttft * 1000:.0f} ms",
                flush=True,
            )
    finally:
        await engine.close()
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    if args.device.startswith("cuda"):
        print(torch.cuda.get_device_name(0), f"torch {torch.__version__}", flush=True)
    rows = []
    for shape in args.shapes:
        rows += asyncio.run(check(shape, args.streams, args.max_tokens, args.device))
    print_table(
        f"GPU check: transformers engine vs padded generate, {args.max_tokens} new tokens/stream",
        ["shape", "streams", "generate tok/s", "engine tok/s", "engine/generate", "TTFT ms"],
        rows,
    )


if __name__ == "__main__":
    main()
