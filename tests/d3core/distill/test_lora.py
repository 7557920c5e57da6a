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


def test_merged_weight_on_plain_tensors_equals_peft_merge():
    """The streaming export merges from the adapter tensors alone; it must agree exactly with peft's own merge."""
    from d3core.distill.lora import merged_weight

    settings = LoraSettings(rank=4, alpha=8.0, targets=("q", "up"))
    model = apply_lora(small_model(), settings)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)  # peft starts B at zero, which would hide a wrong formula
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    merged = merge_lora(model).state_dict()
    for stem in ("layers.0.attn.q", "layers.1.mlp.up"):
        ours = merged_weight(state[f"{stem}.base_layer.weight"], state[f"{stem}.lora_A.default.weight"],
                             state[f"{stem}.lora_B.default.weight"], settings)
        assert not torch.equal(ours, state[f"{stem}.base_layer.weight"])
        assert torch.equal(ours, merged[f"{stem}.weight"]), stem
    with pytest.raises(ValueError, match="do not fit a base weight"):
        merged_weight(state["layers.0.attn.q.base_layer.weight"], state["layers.0.attn.q.lora_A.default.weight"],
                      state["layers.0.attn.q.lora_B.default.weight"], LoraSettings(rank=8))
