"""Official-layout checkpoints: key names, config fields, bit-identical round trips, errors."""

from __future__ import annotations

import json

import fsspec
import pytest
import torch

from d3core.models.checkpoint import load_config, load_pretrained, official_names, save_pretrained
from d3core.models.registry import build_model

# Parameter names of one block and the globals, as listed in the official
# GSAI-ML/LLaDA-8B-Instruct model.safetensors.index.json (OLMo-style LLaDAModelLM).
LLADA_OFFICIAL_BLOCK = [
    "model.transformer.blocks.{i}.attn_norm.weight",
    "model.transformer.blocks.{i}.attn_out.weight",
    "model.transformer.blocks.{i}.ff_norm.weight",
    "model.transformer.blocks.{i}.ff_out.weight",
    "model.transformer.blocks.{i}.ff_proj.weight",
    "model.transformer.blocks.{i}.k_proj.weight",
    "model.transformer.blocks.{i}.q_proj.weight",
    "model.transformer.blocks.{i}.up_proj.weight",
    "model.transformer.blocks.{i}.v_proj.weight",
]
LLADA_OFFICIAL_GLOBAL = ["model.transformer.ff_out.weight", "model.transformer.ln_f.weight",
                         "model.transformer.wte.weight"]

# Parameter names of Dream-org/Dream-v0-Instruct-7B (Qwen2 layout: q/k/v biases, no o_proj bias).
DREAM_OFFICIAL_BLOCK = [
    "model.layers.{i}.input_layernorm.weight",
    "model.layers.{i}.mlp.down_proj.weight",
    "model.layers.{i}.mlp.gate_proj.weight",
    "model.layers.{i}.mlp.up_proj.weight",
    "model.layers.{i}.post_attention_layernorm.weight",
    "model.layers.{i}.self_attn.k_proj.bias",
    "model.layers.{i}.self_attn.k_proj.weight",
    "model.layers.{i}.self_attn.o_proj.weight",
    "model.layers.{i}.self_attn.q_proj.bias",
    "model.layers.{i}.self_attn.q_proj.weight",
    "model.layers.{i}.self_attn.v_proj.bias",
    "model.layers.{i}.self_attn.v_proj.weight",
]
DREAM_OFFICIAL_GLOBAL = ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]

SMALL = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)


def small_model(arch: str):
    kv = 4 if arch == "llada" else 2
    return build_model(arch, "tiny", seed=0, num_kv_heads=kv, **SMALL).eval()


def expected_names(block, glob, layers):
    return sorted(glob + [n.format(i=i) for i in range(layers) for n in block])


def sample_ids(model, b=2, t=12):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (b, t), generator=g)


@pytest.mark.parametrize("arch,block,glob", [
    ("llada", LLADA_OFFICIAL_BLOCK, LLADA_OFFICIAL_GLOBAL),
    ("dream", DREAM_OFFICIAL_BLOCK, DREAM_OFFICIAL_GLOBAL),
])
def test_official_parameter_names(arch, block, glob, tmp_path):
    model = small_model(arch)
    assert official_names(model) == expected_names(block, glob, 2)
    save_pretrained(model, str(tmp_path))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == expected_names(block, glob, 2)


def test_official_config_fields(tmp_path):
    save_pretrained(small_model("llada"), str(tmp_path / "llada"))
    save_pretrained(small_model("dream"), str(tmp_path / "dream"))
    llada = json.loads((tmp_path / "llada" / "config.json").read_text())
    dream = json.loads((tmp_path / "dream" / "config.json").read_text())
    assert llada["architectures"] == ["LLaDAModelLM"] and llada["model_type"] == "llada"
    assert (llada["d_model"], llada["n_layers"], llada["n_heads"], llada["mlp_hidden_size"]) == (32, 2, 4, 64)
    assert llada["mask_token_id"] == small_model("llada").config.mask_id
    assert dream["architectures"] == ["DreamModel"] and dream["model_type"] == "Dream"
    assert (dream["hidden_size"], dream["num_hidden_layers"], dream["num_key_value_heads"]) == (32, 2, 2)
    assert dream["tie_word_embeddings"] is False


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("where", ["local", "memory", "sharded"])
def test_round_trip_is_bit_identical(arch, where, tmp_path):
    model = small_model(arch)
    if where == "local":
        uri, kwargs = str(tmp_path / "ckpt"), {}
    elif where == "memory":
        uri, kwargs = f"memory://d3ray-test/{arch}", {}
    else:
        uri, kwargs = "file://" + str(tmp_path / "sharded"), {"max_shard_bytes": 20_000}
    save_pretrained(model, uri, **kwargs)
    if where == "sharded":
        assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
        assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    loaded = load_pretrained(uri)
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    ids = sample_ids(model)
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    assert loaded.config == model.config
    if where == "memory":
        fsspec.filesystem("memory").rm(f"/d3ray-test/{arch}", recursive=True)


def test_special_ids_come_from_the_checkpoint(tmp_path):
    model = small_model("llada")
    save_pretrained(model, str(tmp_path))
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["mask_token_id"] = 7
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 9]}))
    cfg = load_config(str(tmp_path))
    assert cfg.mask_id == 7 and cfg.eos_ids == (3, 9)


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    save_pretrained(small_model("llada"), str(tmp_path))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.transformer.blocks.1.up_proj.weight"]
    tensors["model.transformer.blocks.1.extra.weight"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['model.transformer.blocks.1.up_proj.weight'\].*extra"):
        load_pretrained(str(tmp_path))


def test_unknown_model_type_and_missing_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type='bert'"):
        load_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(str(tmp_path / "nowhere"))


def test_unsupported_llada_variant_is_refused(tmp_path):
    save_pretrained(small_model("llada"), str(tmp_path))
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["weight_tying"] = True
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="weight_tying=True"):
        load_pretrained(str(tmp_path))


def test_meta_construction_allocates_nothing():
    model = build_model("llada", "llada-8b", device="meta")
    assert all(p.is_meta for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    assert n == model.config.num_parameters()
    assert 7.5e9 < n < 8.5e9
    dream = build_model("dream", "dream-7b", device="meta")
    assert 7.0e9 < sum(p.numel() for p in dream.parameters()) < 8.0e9


def test_init_from_a_causal_lm_copies_every_block(tmp_path):
    from d3core.models.ar import build_ar_model
    from d3core.models.checkpoint import init_from_causal_lm

    ar = build_ar_model(seed=1)
    ar.save_pretrained(str(tmp_path))
    dllm = build_model("llada", "tiny", seed=0)
    assert init_from_causal_lm(dllm, str(tmp_path)) == []
    assert torch.equal(dllm.layers[2].mlp.down.weight, ar.model.layers[2].mlp.down_proj.weight)
    assert torch.equal(dllm.head.weight, ar.lm_head.weight)
    # same weights; causal and bidirectional attention agree on a one-token input
    ids = torch.tensor([[2]])
    with torch.no_grad():
        torch.testing.assert_close(dllm(ids), ar(ids).logits, rtol=1e-5, atol=1e-5)
    wrong = build_model("llada", "tiny", seed=0, hidden_size=64, num_heads=4, intermediate_size=128)
    with pytest.raises(ValueError, match="build the dLLM with the causal LM's sizes"):
        init_from_causal_lm(wrong, str(tmp_path))
