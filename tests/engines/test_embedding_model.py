"""``task: embed``: an encoder folder served as an embedding model, pooled as its
sentence-transformers files say, refusing generation by name.

The encoder is a small BERT with random weights saved as a Hugging Face folder (no
model hub here): what is checked is that the pooling the folder declares is the one
applied (against transformers run directly), not the quality of the vectors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from cyllm import errors
from cyllm.worker.engines.embedding_engine import EmbeddingEngine
from cyllm.worker.engines.factory import create_engine, resolve_engine_name
from cyllm.worker.engines.hf_embed import Pooling
from cyllm.worker.engines.types import GenerationRequest
from cyllm.worker.settings import ModelSpec

WORDS = "the a cat dog sat on mat rug revenue grew quarterly by ten percent".split()


def encoder_folder(root: Path, pooling: str | None) -> Path:
    """A BERT folder; ``pooling`` names the sentence-transformers mode key (None: no
    modules.json, a plain transformers folder)."""
    folder = root / f"bert-{pooling or 'plain'}"
    folder.mkdir()
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=5 + len(WORDS),
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    if pooling is not None:
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(
            json.dumps({"word_embedding_dimension": 48, pooling: True})
        )
        (folder / "modules.json").write_text(
            json.dumps(
                [
                    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                    {
                        "idx": 1,
                        "name": "1",
                        "path": "1_Pooling",
                        "type": "sentence_transformers.models.Pooling",
                    },
                ]
            )
        )
    return folder


def reference(folder: Path, text: str, mode: str) -> torch.Tensor:
    """The vector computed with transformers directly."""
    tok = BertTokenizerFast.from_pretrained(folder)
    model = BertModel.from_pretrained(folder).eval()
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        states = model(**enc).last_hidden_state[0]
    v = {"cls": states[0], "mean": states.mean(0), "last": states[-1]}[mode]
    return torch.nn.functional.normalize(v, dim=-1)


@pytest.mark.parametrize(
    ("key", "mode"),
    [
        ("pooling_mode_cls_token", "cls"),
        ("pooling_mode_mean_tokens", "mean"),
        ("pooling_mode_lasttoken", "last"),
        (None, "mean"),
    ],
)
async def test_an_encoder_is_pooled_as_its_folder_says(tmp_path, key, mode):
    folder = encoder_folder(tmp_path, key)
    spec = ModelSpec(id="enc", path=folder, task="embed", dtype="float32")
    assert resolve_engine_name(spec, "auto") == "embedding"
    engine = create_engine(spec, tmp_path / "cache", "auto")
    assert isinstance(engine, EmbeddingEngine)
    card = await engine.load()
    try:
        assert card.engine == "embedding" and card.context_length == 64
        (vector,), tokens = await engine.embed(["the cat sat on the mat"])
        assert tokens == 8  # [CLS] six words [SEP]
        expected = reference(folder, "the cat sat on the mat", mode)
        assert torch.allclose(torch.tensor(vector), expected, atol=1e-4)
        with pytest.raises(errors.InvalidRequest) as info:
            async for _ in engine.generate(GenerationRequest("r", prompt="the cat")):
                pass
        assert info.value.param == "model" and "embedding model" in info.value.message
        with pytest.raises(errors.ContextLengthExceeded):
            await engine.embed(["the " * 100])
        assert engine.health().healthy
    finally:
        await engine.close()
    assert not engine.health().healthy


def test_a_pooling_it_does_not_do_is_refused_by_name(tmp_path):
    folder = encoder_folder(tmp_path, "pooling_mode_weightedmean_tokens")
    with pytest.raises(errors.NotLoadable, match="pooling_mode_weightedmean_tokens"):
        Pooling.of_folder(folder)


def test_embed_takes_an_encoder_folder_and_no_other_engine():
    with pytest.raises(ValueError, match="task 'embed'"):
        ModelSpec(id="e", path="/x", task="embed", engine="vllm")
    with pytest.raises(ValueError, match="task 'embed'"):
        ModelSpec(id="e", gguf="/x.gguf", task="embed")
