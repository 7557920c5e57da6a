"""LLaDA (GSAI-ML/LLaDA-8B-Instruct): a bidirectional OLMo-style LLaMA encoder.

The official checkpoint is a ``LLaDAModelLM`` saved with OLMo-style config names
(``d_model``, ``n_layers``, ``mlp_hidden_size``, ...) and parameter names under
``model.transformer``. This module maps both to d3core's :class:`ModelConfig` and
:class:`DiffusionTransformer` and back, so checkpoints round-trip in the official layout.
"""

from __future__ import annotations

from typing import Any

from d3core.models.config import ModelConfig
from d3core.models.layers import DiffusionTransformer

ARCH = "llada"

# The official repo and the remote-code classes its config.json names (read from its config.json).
OFFICIAL_REPO = "GSAI-ML/LLaDA-8B-Instruct"
AUTO_MAP = {
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
    "AutoModel": "modeling_llada.LLaDAModelLM",
}

# Official parameter name -> d3core parameter name; "{i}" is the block index.
PARAM_MAP: dict[str, str] = {
    "model.transformer.wte.weight": "embed.weight",
    "model.transformer.blocks.{i}.attn_norm.weight": "layers.{i}.attn_norm.weight",
    "model.transformer.blocks.{i}.q_proj.weight": "layers.{i}.attn.q.weight",
    "model.transformer.blocks.{i}.k_proj.weight": "layers.{i}.attn.k.weight",
    "model.transformer.blocks.{i}.v_proj.weight": "layers.{i}.attn.v.weight",
    "model.transformer.blocks.{i}.attn_out.weight": "layers.{i}.attn.o.weight",
    "model.transformer.blocks.{i}.ff_norm.weight": "layers.{i}.mlp_norm.weight",
    "model.transformer.blocks.{i}.ff_proj.weight": "layers.{i}.mlp.gate.weight",
    "model.transformer.blocks.{i}.up_proj.weight": "layers.{i}.mlp.up.weight",
    "model.transformer.blocks.{i}.ff_out.weight": "layers.{i}.mlp.down.weight",
    "model.transformer.ln_f.weight": "norm.weight",
    "model.transformer.ff_out.weight": "head.weight",
}

# Values the official config carries that d3core's layers assume; a checkpoint that
# disagrees is a different architecture and is refused rather than silently misread.
REQUIRED_CONFIG = {
    "block_type": "llama",
    "activation_type": "silu",
    "layer_norm_type": "rms",
    "weight_tying": False,
    "include_bias": False,
    "alibi": False,
    "rope": True,
}


class LLaDAModel(DiffusionTransformer):
    """LLaDA architecture; identical maths to the official modeling file, our own cache."""


def config_from_hf(raw: dict[str, Any], special: dict[str, Any] | None = None) -> ModelConfig:
    """Translate an official LLaDA ``config.json`` (plus tokenizer special ids) to a ModelConfig."""
    for key, want in REQUIRED_CONFIG.items():
        if key in raw and raw[key] != want:
            raise ValueError(
                f"LLaDA config {key}={raw[key]!r} is not supported: d3core implements {key}={want!r} "
                "(the LLaDA-8B layout)"
            )
    special = special or {}
    eos = special.get("eos_ids") or [raw["eos_token_id"]]
    mask_id = raw.get("mask_token_id", special.get("mask_id"))
    if mask_id is None:
        raise ValueError(
            "LLaDA config has no mask_token_id and the tokenizer names no mask token: "
            "add \"mask_token_id\" to config.json"
        )
    mlp = raw.get("mlp_hidden_size") or raw["mlp_ratio"] * raw["d_model"]
    return ModelConfig(
        arch=ARCH,
        vocab_size=raw.get("embedding_size") or raw["vocab_size"],
        hidden_size=raw["d_model"],
        num_layers=raw["n_layers"],
        num_heads=raw["n_heads"],
        num_kv_heads=raw.get("n_kv_heads") or raw["n_heads"],
        intermediate_size=mlp,
        max_seq_len=raw.get("max_sequence_length", 4096),
        mask_id=mask_id,
        eos_ids=tuple(eos),
        pad_id=raw.get("pad_token_id", eos[0]),
        bos_id=raw.get("bos_token_id", special.get("bos_id")),
        rope_theta=float(raw.get("rope_theta", 10000.0)),
        rms_eps=float(raw.get("rms_norm_eps", 1e-5)),
        qkv_bias=bool(raw.get("include_qkv_bias", False)),
        shift_logits=False,
        extra={"vocab_size": raw["vocab_size"]},
    )


def config_to_hf(cfg: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """The official LLaDA ``config.json`` field set for ``cfg``, weights stored as ``torch_dtype``.

    ``auto_map`` points into the official repo (``repo--module.Class``), so
    ``AutoModel.from_pretrained(dir, trust_remote_code=True)`` finds the official modeling code
    without a copy of it. The dropout fields are written as 0.0 because the official
    ``LLaDAConfig`` defaults them to 0.1.
    """
    return {
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "auto_map": {k: f"{OFFICIAL_REPO}--{v}" for k, v in AUTO_MAP.items()},
        "attention_dropout": 0.0,
        "residual_dropout": 0.0,
        "embedding_dropout": 0.0,
        "activation_type": "silu",
        "alibi": False,
        "attention_layer_norm": False,
        "block_type": "llama",
        "d_model": cfg.hidden_size,
        "embedding_size": cfg.vocab_size,
        "vocab_size": cfg.extra.get("vocab_size", cfg.vocab_size),
        "eos_token_id": cfg.eos_ids[0],
        "pad_token_id": cfg.pad_id,
        "mask_token_id": cfg.mask_id,
        **({"bos_token_id": cfg.bos_id} if cfg.bos_id is not None else {}),
        "include_bias": False,
        "include_qkv_bias": cfg.qkv_bias,
        "layer_norm_type": "rms",
        "rms_norm_eps": cfg.rms_eps,
        "max_sequence_length": cfg.max_seq_len,
        "mlp_hidden_size": cfg.intermediate_size,
        "mlp_ratio": cfg.intermediate_size // cfg.hidden_size or 1,
        "n_heads": cfg.num_heads,
        "n_kv_heads": cfg.num_kv_heads,
        "n_layers": cfg.num_layers,
        "rope": True,
        "rope_theta": cfg.rope_theta,
        "weight_tying": False,
        "use_cache": False,
        "torch_dtype": torch_dtype,
    }
