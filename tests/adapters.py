"""Real PEFT LoRA adapters for the default model, made in the test (nothing to download):
random, non-zero A and B, so an adapter visibly changes what the model says."""

from __future__ import annotations

from pathlib import Path


def make_adapter(base: Path, out: Path, seed: int, r: int = 8, scale: float = 20.0) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(scale)
    peft_model.save_pretrained(out)
    return out
