"""Dream (Dream-org/Dream-v0-Instruct-7B): Qwen2.5 weights run bidirectionally.

Qwen2-style names (``model.layers.N.self_attn.q_proj``), biases on q/k/v, grouped KV
heads, and *shifted* logits: the prediction for position ``i`` is the output at ``i - 1``,
because the model was initialised from an autoregressive LM.
"""

from __future__ import annotations

from typing import Any

from d3core.models.config import ModelConfig
from d3core.models.layers import DiffusionTransformer

ARCH = "dream"

# The official repo and the remote-code classes its config.json names (read from its config.json).
OFFICIAL_REPO = "Dream-org/Dream-v0-Instruct-7B"
AUTO_MAP = {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"}

# Official parameter name -> d3core parameter name; "{i}" is the layer index.
PARAM_MAP: dict[str, str] = {
    "model.embed_tokens.weight": "embed.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attn.q.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "layers.{i}.attn.q.bias",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attn.k.weight",
    "model.layers.{i}.self_attn.k_proj.bias": "layers.{i}.attn.k.bias",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attn.v.weight",
    "model.layers.{i}.self_attn.v_proj.bias": "layers.{i}.attn.v.bias",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attn.o.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.mlp_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.mlp.gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.mlp.up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.mlp.down.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "head.weight",
}


class DreamModel(DiffusionTransformer):
    """Dream architecture: shifted logits, QKV bias, GQA."""


def config_from_hf(raw: dict[str, Any], special: dict[str, Any] | None = None) -> ModelConfig:
    """Translate an official Dream ``config.json`` (plus tokenizer special ids) to a ModelConfig."""
    if raw.get("tie_word_embeddings", False):
        raise ValueError(
            "Dream config tie_word_embeddings=True is not supported: Dream-v0 checkpoints have an "
            "untied lm_head; re-export with tie_word_embeddings=false"
        )
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Dream config hidden_act={raw['hidden_act']!r} is not supported: d3core implements silu")
    special = special or {}
    eos = special.get("eos_ids") or [raw["eos_token_id"]]
    mask_id = raw.get("mask_token_id", special.get("mask_id"))
    if mask_id is None:
        raise ValueError("Dream config has no mask_token_id: add \"mask_token_id\" to config.json")
    return ModelConfig(
        arch=ARCH,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=raw["num_attention_heads"],
        num_kv_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
        intermediate_size=raw["intermediate_size"],
        max_seq_len=raw.get("max_position_embeddings", 2048),
        mask_id=mask_id,
        eos_ids=tuple(eos),
        pad_id=raw.get("pad_token_id", eos[0]),
        bos_id=raw.get("bos_token_id"),
        rope_theta=float(raw.get("rope_theta", 10000.0)),
        rms_eps=float(raw.get("rms_norm_eps", 1e-6)),
        qkv_bias=True,
        shift_logits=True,
    )


def config_to_hf(cfg: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """The official Dream ``config.json`` field set for ``cfg``, weights stored as ``torch_dtype``.

    ``auto_map`` points into the official repo (``repo--module.Class``), so no modeling code is copied.
    """
    return {
        "architectures": ["DreamModel"],
        "model_type": "Dream",
        "auto_map": {k: f"{OFFICIAL_REPO}--{v}" for k, v in AUTO_MAP.items()},
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_eps,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": False,
        "mask_token_id": cfg.mask_id,
        "pad_token_id": cfg.pad_id,
        "eos_token_id": cfg.eos_ids[0],
        **({"bos_token_id": cfg.bos_id} if cfg.bos_id is not None else {}),
        "max_window_layers": cfg.num_layers,
        "rope_scaling": None,
        "sliding_window": None,
        "use_sliding_window": False,
        "use_mrope": False,
        "use_cache": False,
        "torch_dtype": torch_dtype,
    }
