"""Student inputs from teacher trajectories (d3LLM pseudo-trajectory masking) and the random fallback.

For a row with response slots ``[0, R)`` and window size ``k`` at mask ratio ``t`` a window
``[s, min(s + k, R))`` is drawn (``n ~ U{0 .. ceil(R / k) - 1}``, ``s = n * k``; d3LLM's code can
also draw an empty tail window, which is skipped here).
The teacher's snapshot after ``n * k + int((1 - t) * k)`` revealed slots decides the window:
slots the teacher had not yet revealed are masked; slots before the window are clean and
slots after it are all masked. The *complementary* view masks exactly the window slots the
first view left clean, so every window slot is supervised once across the two views.
The loss runs on masked window slots only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RANDOM_EPS = 1e-3


@dataclass
class StudentViews:
    inputs: torch.Tensor  # (B, L) view A token ids (prompt clean)
    loss_mask: torch.Tensor  # (B, L) True where view A is supervised
    inputs_rev: torch.Tensor  # (B, L) complementary view
    loss_mask_rev: torch.Tensor  # (B, L)
    window: torch.Tensor  # (B, 2) window [start, end) in response coordinates


def trajectory_views(
    clean: torch.Tensor,
    unmask_step: torch.Tensor,
    prompt_len: int,
    window_size: int,
    mask_ratio: torch.Tensor,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> StudentViews:
    """Vectorised d3LLM masking.

    Args:
        clean: ``(B, P + R)`` prompt (left-padded to ``prompt_len``) and teacher response.
        unmask_step: ``(B, R)`` the teacher's reveal rank of every response slot; ranks are
            compared against ``n * k + int((1 - t) * k)`` revealed slots.
        mask_ratio: ``(B,)`` per-row ``t`` in [0, 1].
    """
    b, total = clean.shape
    r = total - prompt_len
    k = window_size
    if not 1 <= k <= r:
        raise ValueError(f"window_size={k}: must lie in [1, response length {r}]")
    start, end = draw_windows(b, r, k, generator)
    n = start // k
    revealed = n * k + ((1 - mask_ratio) * k).long()  # slots the teacher had revealed at that snapshot
    rank = _reveal_rank(unmask_step)
    slots = torch.arange(r)[None]
    in_window = (slots >= start[:, None]) & (slots < end[:, None])
    after = slots >= end[:, None]
    hidden = rank >= revealed[:, None]  # still masked in the teacher's snapshot
    mask_a = (in_window & hidden) | after
    mask_b = (in_window & ~hidden) | after
    inputs, inputs_rev = clean.clone(), clean.clone()
    inputs[:, prompt_len:] = torch.where(mask_a, mask_id, clean[:, prompt_len:])
    inputs_rev[:, prompt_len:] = torch.where(mask_b, mask_id, clean[:, prompt_len:])
    pad = torch.zeros(b, prompt_len, dtype=torch.bool)
    return StudentViews(inputs, torch.cat([pad, in_window & hidden], 1), inputs_rev,
                        torch.cat([pad, in_window & ~hidden], 1), torch.stack([start, end], 1))


def draw_windows(batch: int, r: int, k: int, generator: torch.Generator | None = None):
    """Window ``n ~ U{0 .. ceil(r / k) - 1}`` per row: ``[n k, min(n k + k, r))`` in response slots."""
    n = torch.randint(0, -(-r // k), (batch,), generator=generator)
    start = n * k
    return start, torch.clamp(start + k, max=r)


def _reveal_rank(unmask_step: torch.Tensor) -> torch.Tensor:
    """Rank of each slot in reveal order (ties, several slots in one step, broken by position)."""
    order = torch.argsort(unmask_step * unmask_step.shape[1] + torch.arange(unmask_step.shape[1])[None], dim=1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(unmask_step.shape[1]).expand_as(order))
    return rank


def random_views(
    clean: torch.Tensor,
    prompt_len: int,
    window_size: int,
    mask_ratio: torch.Tensor,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> StudentViews:
    """The dParallel-style fallback: the same windows, but masked at random with p = (1 - eps) t + eps."""
    b, total = clean.shape
    r = total - prompt_len
    if not 1 <= window_size <= r:
        raise ValueError(f"window_size={window_size}: must lie in [1, response length {r}]")
    start, end = draw_windows(b, r, window_size, generator)
    fake_steps = torch.rand(b, r, generator=generator)
    p = (1 - RANDOM_EPS) * mask_ratio + RANDOM_EPS
    slots = torch.arange(r)[None]
    in_window = (slots >= start[:, None]) & (slots < end[:, None])
    after = slots >= end[:, None]
    hidden = fake_steps < p[:, None]
    inputs, inputs_rev = clean.clone(), clean.clone()
    inputs[:, prompt_len:] = torch.where((in_window & hidden) | after, mask_id, clean[:, prompt_len:])
    inputs_rev[:, prompt_len:] = torch.where((in_window & ~hidden) | after, mask_id, clean[:, prompt_len:])
    pad = torch.zeros(b, prompt_len, dtype=torch.bool)
    return StudentViews(inputs, torch.cat([pad, in_window & hidden], 1), inputs_rev,
                        torch.cat([pad, in_window & ~hidden], 1), torch.stack([start, end], 1))
