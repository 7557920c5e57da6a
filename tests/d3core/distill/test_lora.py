"""LoRA through peft: only adapters train, and merging gives the adapted model's logits in plain weights."""

from __future__ import annotations

import pytest
import torch

from d3core.distill.lora import LoraSettings, apply_lora, merge_lora
from d3core.models.checkpoint import load_pretrained, official_names, save_pretrained
from d3core.models.registry import build_model

pytest.importorskip("peft")


def small_model():
    return build_model("llada", "tiny", seed=0, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                       intermediate_size=64)


def test_only_adapters_train_and_merge_keeps_the_logits(tmp_path):
    model = apply_lora(small_model(), LoraSettings(rank=4, alpha=8.0, targets=("q", "v", "down")))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 3 * 2  # A and B, 3 targets, 2 layers
    x = torch.randint(10, 100, (2, 12))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    before = model(x).detach()
    model(x).float().pow(2).mean().backward()
    opt.step()
    adapted = model(x).detach()
    assert not torch.allclose(before, adapted)  # the adapters (B starts at 0) really moved the output

    merged = merge_lora(model)
    assert not any("lora_" in n or "base_layer" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(x), adapted, rtol=1e-4, atol=1e-5)
    save_pretrained(merged, str(tmp_path))  # the official layout again
    reloaded = load_pretrained(str(tmp_path))
    assert official_names(reloaded) == official_names(small_model())
    torch.testing.assert_close(reloaded(x), adapted, rtol=1e-4, atol=1e-5)


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match="rank=0"):
        LoraSettings(rank=0)
    with pytest.raises(ValueError, match="matched no linear layer"):
        apply_lora(small_model(), LoraSettings(targets=("nope",)))
