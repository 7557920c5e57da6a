"""Distillation losses and curricula (d3LLM §1.5-1.6, dParallel certainty forcing).

``loss = ce + ce_rev + w_ent * (ent [+ ent_rev])`` where ``ce`` is the mean cross-entropy over a
view's supervised slots and ``ent`` the mean entropy of ``softmax(logits / T_ent)`` over the
supervised slots whose argmax is already correct ("certainty forcing": sharpen what is right).
d3LLM divides by a constant 4 (a leftover grad-accumulation factor); ``scale`` keeps that choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    entropy_weight: float = 2.0
    entropy_temperature: float = 0.5
    complementary: bool = True
    entropy_on_complement: bool = False
    scale: float = 0.25

    def __post_init__(self) -> None:
        if self.entropy_weight < 0:
            raise ValueError(f"entropy_weight={self.entropy_weight}: must be >= 0")
        if self.entropy_temperature <= 0:
            raise ValueError(f"entropy_temperature={self.entropy_temperature}: must be > 0")
        if self.scale <= 0:
            raise ValueError(f"scale={self.scale}: must be > 0")


def masked_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    mask = mask.reshape(-1).float()
    return (ce * mask).sum() / mask.sum().clamp_min(1.0)


def certainty_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, temperature: float):
    """Mean entropy of ``softmax(logits / T)`` over supervised slots whose argmax equals the target."""
    correct = mask & (logits.argmax(-1) == targets)
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    h = -(logp.exp() * logp).sum(-1)
    return (h * correct).sum() / correct.sum().clamp_min(1)


def distill_loss(logits, logits_rev, targets, mask, mask_rev, weights: LossWeights) -> dict[str, torch.Tensor]:
    parts = {"ce": masked_ce(logits, targets, mask),
             "ent": certainty_entropy(logits, targets, mask, weights.entropy_temperature)}
    total = parts["ce"] + weights.entropy_weight * parts["ent"]
    if weights.complementary and logits_rev is not None:
        parts["ce_rev"] = masked_ce(logits_rev, targets, mask_rev)
        total = total + parts["ce_rev"]
        if weights.entropy_on_complement:
            parts["ent_rev"] = certainty_entropy(logits_rev, targets, mask_rev, weights.entropy_temperature)
            total = total + weights.entropy_weight * parts["ent_rev"]
    parts["loss"] = total * weights.scale
    return parts


def mask_ratio_bounds(step: int, max_steps: int, lo: float = 0.0, hi: float = 0.8) -> tuple[float, float]:
    """Progressive noise: ``t ~ U(lo + (step / max_steps) (hi - lo), hi)``."""
    frac = min(max(step / max(max_steps, 1), 0.0), 1.0)
    return lo + frac * (hi - lo), hi


def window_size(epoch_progress: float, sizes: list[int]) -> int:
    """Progressive window: within epoch ``e`` interpolate ``sizes[e] -> sizes[e + 1]``; the last stays."""
    if not sizes:
        raise ValueError("sizes is empty: give one window size per epoch, e.g. [16, 24, 32]")
    e = int(epoch_progress)
    if e >= len(sizes) - 1:
        return sizes[-1]
    frac = epoch_progress - e
    return int(sizes[e] + frac * (sizes[e + 1] - sizes[e]))
