"""One distillation step's loss from trajectory rows, exact under data parallelism.

The loss parts are *sums* over supervised slots plus their *counts*; the mean is taken by
:func:`combine` with counts that a data-parallel caller first sums over workers. That makes
the loss (and, scaled by the world size against gradient averaging, the gradients) of a
global batch split over workers equal to the loss of the same batch on one worker.

All randomness of a row (its window, its mask ratio, its random mask) comes from a
generator seeded by ``(seed, step, row id)``, so it does not depend on which worker, or
which position in a batch, a row lands in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from d3core.distill.losses import LossWeights, mask_ratio_bounds, window_size
from d3core.distill.masking import StudentViews, random_views, trajectory_views
from d3core.samplers.base import make_batch

MASKINGS = ("trajectory", "random")


@dataclass(frozen=True)
class DistillObjective:
    """What a distillation step optimises (d3LLM §1.4-1.6; ``masking="random"`` is plain dParallel)."""

    masking: str = "trajectory"
    window_sizes: tuple[int, ...] = (16, 32)  # one per epoch; interpolated within an epoch
    mask_ratio_min: float = 0.0
    mask_ratio_max: float = 0.8
    weights: LossWeights = field(default_factory=LossWeights)

    def __post_init__(self) -> None:
        if self.masking not in MASKINGS:
            raise ValueError(f"masking={self.masking!r}: must be one of {MASKINGS}")
        if not self.window_sizes or any(k < 1 for k in self.window_sizes):
            raise ValueError(f"window_sizes={self.window_sizes}: give one positive size per epoch, e.g. (16, 32)")
        if not 0.0 <= self.mask_ratio_min <= self.mask_ratio_max <= 1.0:
            raise ValueError(f"mask_ratio_min={self.mask_ratio_min}, mask_ratio_max={self.mask_ratio_max}: "
                             "need 0 <= min <= max <= 1")


@dataclass
class TrajectoryBatch:
    ids: list[str]
    clean: torch.Tensor  # (B, P + R) left-padded prompt + the teacher's response
    positions: torch.Tensor
    attention_mask: torch.Tensor
    unmask_step: torch.Tensor  # (B, R)
    prompt_len: int


def collate_rows(
    ids: Sequence[str],
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    unmask_step: Sequence[Sequence[int]],
    mask_id: int,
    pad_id: int,
) -> TrajectoryBatch:
    """Left-pad prompts; every response must have the same number of generation slots."""
    lengths = {len(r) for r in response_ids}
    if len(lengths) != 1:
        raise ValueError(f"response lengths {sorted(lengths)} differ: a trajectory batch needs one generation "
                         "length (regenerate the trajectories with a single gen_length)")
    r = lengths.pop()
    batch = make_batch(prompt_ids, r, mask_id, pad_id)
    clean = batch.x.clone()
    clean[:, batch.prompt_len:] = torch.as_tensor([list(x) for x in response_ids], dtype=torch.long)
    steps = torch.as_tensor([list(s) for s in unmask_step], dtype=torch.long)
    return TrajectoryBatch(list(ids), clean, batch.positions, batch.attention_mask, steps, batch.prompt_len)


def row_uniforms(ids: Sequence[str], seed: int, step: int, width: int) -> torch.Tensor:
    """``(B, width)`` uniforms in [0, 1), a fixed function of ``(seed, step, id)`` per row."""
    out = torch.empty(len(ids), width)
    for i, row_id in enumerate(ids):
        digest = hashlib.blake2b(f"{seed}:{step}:{row_id}".encode(), digest_size=8).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
        out[i] = torch.rand(width, generator=g)
    return out


def build_views(
    objective: DistillObjective, batch: TrajectoryBatch, mask_id: int, step: int, max_steps: int,
    epoch_progress: float, seed: int,
) -> StudentViews:
    r = batch.clean.shape[1] - batch.prompt_len
    k = min(window_size(epoch_progress, list(objective.window_sizes)), r)
    lo, hi = mask_ratio_bounds(step, max_steps, objective.mask_ratio_min, objective.mask_ratio_max)
    u = row_uniforms(batch.ids, seed, step, 2 + r)
    ratio = lo + u[:, 1] * (hi - lo)
    if objective.masking == "trajectory":
        return trajectory_views(batch.clean, batch.unmask_step, batch.prompt_len, k, ratio, mask_id,
                                window_u=u[:, 0])
    return random_views(batch.clean, batch.prompt_len, k, ratio, mask_id, window_u=u[:, 0], mask_u=u[:, 2:])


@dataclass(frozen=True)
class StudentBatch:
    """One step's model inputs and supervision, built on the host (views stacked on the batch axis)."""

    inputs: torch.Tensor  # (n * B, P + R): view A, then the complementary view when used
    positions: torch.Tensor
    attention_mask: torch.Tensor | None  # None: no row is padded (the model skips the key mask)
    targets: torch.Tensor  # (B, R) the teacher's response
    masks: tuple[torch.Tensor, ...]  # (B, R) supervised slots of each view
    prompt_len: int


def student_batch(
    objective: DistillObjective, batch: TrajectoryBatch, mask_id: int, step: int, max_steps: int,
    epoch_progress: float, seed: int = 0,
) -> StudentBatch:
    """The host side of a step: masked views, positions, and whether any row needs a key mask."""
    w = objective.weights
    views = build_views(objective, batch, mask_id, step, max_steps, epoch_progress, seed)
    p = batch.prompt_len
    inputs = torch.cat([views.inputs, views.inputs_rev]) if w.complementary else views.inputs
    n = inputs.shape[0] // batch.clean.shape[0]
    padded = not bool(batch.attention_mask.all())  # host tensors: no device read
    masks = (views.loss_mask[:, p:],) + ((views.loss_mask_rev[:, p:],) if w.complementary else ())
    return StudentBatch(inputs, batch.positions.repeat(n, 1), batch.attention_mask.repeat(n, 1) if padded else None,
                        batch.clean[:, p:], masks, p)


def loss_sums(
    model: torch.nn.Module, objective: DistillObjective, batch: TrajectoryBatch, step: int, max_steps: int,
    epoch_progress: float, seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Sums of the loss parts over this batch's supervised slots, and the slot counts.

    Both views run in one forward (stacked on the batch axis). Parts: ``ce`` / ``ce_rev``
    (cross-entropy on view A / the complementary view) and ``ent`` (certainty-forcing
    entropy at ``weights.entropy_temperature`` on view-A slots whose argmax is correct;
    ``ent_rev`` likewise when ``weights.entropy_on_complement``).
    """
    sb = student_batch(objective, batch, model.config.mask_id, step, max_steps, epoch_progress, seed)
    return student_loss_sums(model, objective.weights, sb)


def student_loss_sums(model: torch.nn.Module, w: LossWeights,
                      sb: StudentBatch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The device side of :func:`loss_sums`: one forward of the stacked views and the loss parts."""
    device = next(model.parameters()).device
    mask = sb.attention_mask.to(device) if sb.attention_mask is not None else None
    logits = model(sb.inputs.to(device), sb.positions.to(device), mask)[:, sb.prompt_len:].float()
    targets = sb.targets.to(device)
    b = targets.shape[0]
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    for j, (suffix, view_mask) in enumerate(zip(("", "_rev"), sb.masks)):
        view_mask = view_mask.to(device)
        lg = logits[j * b:(j + 1) * b]
        ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets.reshape(-1), reduction="none").view_as(view_mask)
        sums["ce" + suffix] = (ce * view_mask).sum()
        counts["ce" + suffix] = view_mask.sum().float()
        if suffix == "" or w.entropy_on_complement:
            correct = view_mask & (lg.argmax(-1) == targets)
            logp = torch.log_softmax(lg / w.entropy_temperature, dim=-1)
            h = -(logp.exp() * logp).sum(-1)
            sums["ent" + suffix] = (h * correct).sum()
            counts["ent" + suffix] = correct.sum().float()
    return sums, counts


def combined_loss(sums: dict[str, torch.Tensor], counts: dict[str, torch.Tensor], weights: LossWeights
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``scale * (ce + ce_rev + w_ent * (ent [+ ent_rev]))`` and the part means, on the device."""
    means = {k: sums[k] / counts[k].clamp_min(1.0) for k in sums}
    total = sum(v * (weights.entropy_weight if k.startswith("ent") else 1.0) for k, v in means.items())
    return total * weights.scale, means


def combine(
    sums: dict[str, torch.Tensor], counts: dict[str, torch.Tensor], weights: LossWeights
) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`combined_loss` from sums and (global) counts, with the parts read back as floats."""
    loss, means = combined_loss(sums, counts, weights)
    return loss, {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in means.items()}}
