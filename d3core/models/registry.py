"""Named architectures and sizes: ``build_model("llada", "tiny")``, ``preset("dream", "dream-7b")``.

Each architecture registers its model class, its official parameter map and its config
translators; each size is a :class:`ModelConfig` (the official 8B/7B shapes with the
special ids their checkpoints ship, and the embedded ``tiny`` shape whose ids come from
the embedded tokenizer).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from d3core.models import dream, llada
from d3core.models.config import ModelConfig
from d3core.models.layers import DiffusionTransformer


@dataclass(frozen=True)
class Architecture:
    name: str
    model_cls: type[DiffusionTransformer]
    param_map: dict[str, str]
    config_from_hf: Callable[[dict[str, Any], dict[str, Any] | None], ModelConfig]
    config_to_hf: Callable[[ModelConfig, str], dict[str, Any]]
    hf_model_types: tuple[str, ...]


ARCHITECTURES: dict[str, Architecture] = {
    llada.ARCH: Architecture(llada.ARCH, llada.LLaDAModel, llada.PARAM_MAP, llada.config_from_hf,
                             llada.config_to_hf, ("llada",)),
    dream.ARCH: Architecture(dream.ARCH, dream.DreamModel, dream.PARAM_MAP, dream.config_from_hf,
                             dream.config_to_hf, ("dream",)),
}


def _tiny(arch: str) -> ModelConfig:
    from d3core.models import tiny_tokenizer as vocab

    return ModelConfig(
        arch=arch,
        vocab_size=vocab.VOCAB_SIZE,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4 if arch == llada.ARCH else 2,
        intermediate_size=384,
        max_seq_len=128,
        mask_id=vocab.MASK_ID,
        eos_ids=(vocab.EOS_ID, vocab.EOT_ID),
        pad_id=vocab.PAD_ID,
        bos_id=vocab.BOS_ID,
        rope_theta=10000.0,
        rms_eps=1e-5 if arch == llada.ARCH else 1e-6,
        qkv_bias=arch == dream.ARCH,
        shift_logits=arch == dream.ARCH,
    )


# The official checkpoints' shapes and special ids (config.json / tokenizer of
# GSAI-ML/LLaDA-8B-Instruct and Dream-org/Dream-v0-Instruct-7B). Loading a checkpoint
# always reads them from its own files; these presets are for building and sizing.
_OFFICIAL: dict[tuple[str, str], dict[str, Any]] = {
    (llada.ARCH, "llada-8b"): dict(
        vocab_size=126464, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
        intermediate_size=12288, max_seq_len=4096, mask_id=126336, eos_ids=(126081, 126348),
        pad_id=126081, bos_id=126080, rope_theta=500000.0, rms_eps=1e-5,
        extra={"vocab_size": 126464},
    ),
    (dream.ARCH, "dream-7b"): dict(
        vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
        intermediate_size=18944, max_seq_len=131072, mask_id=151666, eos_ids=(151643, 151645),
        pad_id=151643, bos_id=151643, rope_theta=1000000.0, rms_eps=1e-6, qkv_bias=True,
        shift_logits=True,
    ),
}


def sizes(arch: str) -> list[str]:
    get_architecture(arch)
    return ["tiny"] + [size for (a, size) in _OFFICIAL if a == arch]


def get_architecture(arch: str) -> Architecture:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}: choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def preset(arch: str, size: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a named size, with optional field overrides (validated)."""
    get_architecture(arch)
    if size == "tiny":
        cfg = _tiny(arch)
    elif (arch, size) in _OFFICIAL:
        cfg = ModelConfig(arch=arch, **_OFFICIAL[(arch, size)])
    else:
        raise ValueError(f"unknown size {size!r} for architecture {arch!r}: choose one of {sizes(arch)}")
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def build_model(
    arch_or_cfg: str | ModelConfig,
    size: str = "tiny",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
    **overrides: Any,
) -> DiffusionTransformer:
    """A freshly initialised model; ``device="meta"`` allocates nothing (for loading)."""
    cfg = arch_or_cfg if isinstance(arch_or_cfg, ModelConfig) else preset(arch_or_cfg, size, **overrides)
    cls = get_architecture(cfg.arch).model_cls
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = cls(cfg)
    if str(device) != "meta":
        init_weights(model)
    return model.to(dtype)


def init_weights(model: DiffusionTransformer, std: float = 0.02) -> None:
    """Normal(0, std) for matrices and embeddings, zeros for biases, ones for norms."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)
        else:
            torch.nn.init.normal_(p, std=std)
