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
    window_u: torch.Tensor | None = None,
) -> StudentViews:
    """Vectorised d3LLM masking.

    Args:
        clean: ``(B, P + R)`` prompt (left-padded to ``prompt_len``) and teacher response.
        unmask_step: ``(B, R)`` the teacher's step of every response slot; slots are ranked by
            (step, position) and compared against ``n * k + int((1 - t) * k)`` revealed slots.
        mask_ratio: ``(B,)`` per-row ``t`` in [0, 1].
        window_u: optional ``(B,)`` uniforms that pick the windows instead of ``generator``
            (per-row noise makes a row's views independent of which worker sees it).
    """
    b, r = clean.shape[0], clean.shape[1] - prompt_len
    start, end = draw_windows(b, r, window_size, generator, window_u)
    revealed = start + ((1 - mask_ratio) * window_size).long()  # slots revealed at that snapshot
    hidden = _reveal_rank(unmask_step) >= revealed[:, None]  # still masked in the teacher's snapshot
    return _assemble(clean, prompt_len, start, end, hidden, mask_id)


def random_views(
    clean: torch.Tensor,
    prompt_len: int,
    window_size: int,
    mask_ratio: torch.Tensor,
    mask_id: int,
    generator: torch.Generator | None = None,
    window_u: torch.Tensor | None = None,
    mask_u: torch.Tensor | None = None,
) -> StudentViews:
    """The dParallel-style fallback: the same windows, but masked at random with p = (1 - eps) t + eps."""
    b, r = clean.shape[0], clean.shape[1] - prompt_len
    start, end = draw_windows(b, r, window_size, generator, window_u)
    p = (1 - RANDOM_EPS) * mask_ratio + RANDOM_EPS
    u = torch.rand(b, r, generator=generator) if mask_u is None else mask_u
    hidden = u < p[:, None]
    return _assemble(clean, prompt_len, start, end, hidden, mask_id)


def draw_windows(batch: int, r: int, k: int, generator: torch.Generator | None = None,
                 u: torch.Tensor | None = None):
    """Window ``n ~ U{0 .. ceil(r / k) - 1}`` per row: ``[n k, min(n k + k, r))`` in response slots.

    ``u`` (``(batch,)`` uniforms in [0, 1)) picks ``n = floor(u * ceil(r / k))`` instead of ``generator``.
    """
    if not 1 <= k <= r:
        raise ValueError(f"window_size={k}: must lie in [1, response length {r}]")
    count = -(-r // k)
    if u is None:
        n = torch.randint(0, count, (batch,), generator=generator)
    else:
        n = torch.clamp((u * count).long(), max=count - 1)
    start = n * k
    return start, torch.clamp(start + k, max=r)


def _reveal_rank(unmask_step: torch.Tensor) -> torch.Tensor:
    """Rank of each slot in reveal order (ties, several slots in one step, broken by position)."""
    order = torch.argsort(unmask_step * unmask_step.shape[1] + torch.arange(unmask_step.shape[1])[None], dim=1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(unmask_step.shape[1]).expand_as(order))
    return rank


def _assemble(clean, prompt_len, start, end, hidden, mask_id) -> StudentViews:
    """View A masks the window's hidden slots, view B the rest of the window; both mask the future."""
    b, r = clean.shape[0], clean.shape[1] - prompt_len
    slots = torch.arange(r)[None]
    in_window = (slots >= start[:, None]) & (slots < end[:, None])
    after = slots >= end[:, None]
    pad = torch.zeros(b, prompt_len, dtype=torch.bool)
    views = []
    for supervised in (in_window & hidden, in_window & ~hidden):
        inputs = clean.clone()
        inputs[:, prompt_len:] = torch.where(supervised | after, mask_id, clean[:, prompt_len:])
        views += [inputs, torch.cat([pad, supervised], 1)]
    return StudentViews(*views, torch.stack([start, end], 1))
