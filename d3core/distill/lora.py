"""Optional LoRA for distillation through ``peft``, merged back into plain weights on export.

``apply_lora`` injects adapters into the named linear layers of a d3core model (the base
weights are frozen); ``merge_lora`` folds every adapter into its base weight and puts the
plain ``nn.Linear`` back, so the merged model has the official parameter names again and
saves in the official layout like any other checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank={self.rank}: a LoRA rank must be >= 1 (use no LoRA for full fine-tuning)")
        if self.alpha <= 0:
            raise ValueError(f"alpha={self.alpha}: must be > 0")
        if not self.targets:
            raise ValueError("targets is empty: name the linear layers to adapt, e.g. ('q', 'v')")


def _peft():
    try:
        import peft
    except ImportError as err:
        raise ImportError("LoRA needs peft: pip install -e '.[lora]' (or pip install peft)") from err
    return peft


def apply_lora(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """Inject adapters in place; only adapter weights stay trainable."""
    peft = _peft()
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0,
                             target_modules=list(settings.targets))
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    try:
        model = peft.inject_adapter_in_model(config, model)
    except ValueError as err:
        raise ValueError(f"targets={settings.targets} matched no linear layer of this model ({err}); "
                         f"its linear layers are named {linear}") from err
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError(f"targets={settings.targets} matched no linear layer of this model; "
                         f"its linear layers are named {linear}")
    logger.info("LoRA rank %d on %s: %d trainable parameters", settings.rank, settings.targets, trainable)
    return model


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold adapters into their base weights and restore the plain layers (in place)."""
    peft = _peft()
    lora_layer = peft.tuners.lora.LoraLayer
    for name, module in list(model.named_modules()):
        if isinstance(module, lora_layer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def merged_weight(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                  settings: LoraSettings) -> torch.Tensor:
    """``base + (lora_b @ lora_a) * alpha / rank``: peft's merge of one ``nn.Linear`` adapter, on plain tensors.

    The distillation export merges adapters this way while streaming tensors from a sharded
    training checkpoint, without rebuilding the model; it matches :func:`merge_lora` exactly.
    """
    if lora_a.shape != (settings.rank, base.shape[1]) or lora_b.shape != (base.shape[0], settings.rank):
        raise ValueError(f"LoRA shapes A{tuple(lora_a.shape)} B{tuple(lora_b.shape)} do not fit a base weight "
                         f"{tuple(base.shape)} at rank {settings.rank}")
    return base + (lora_b @ lora_a) * (settings.alpha / settings.rank)
