"""Trajectory masking against a plain-Python reference on random trajectories."""

from __future__ import annotations

import random

import pytest
import torch

from d3core.distill.masking import random_views, trajectory_views

MASK = 5


def reference(clean_row, steps_row, prompt_len, k, t, start, end):
    """Per-slot, per-definition: reveal order by (step, position); snapshot after n*k + int((1-t)k) reveals."""
    r = len(steps_row)
    order = sorted(range(r), key=lambda i: (steps_row[i], i))
    revealed = set(order[: (start // k) * k + int((1 - t) * k)])
    a, b, la, lb = list(clean_row), list(clean_row), [False] * len(clean_row), [False] * len(clean_row)
    for i in range(r):
        pos = prompt_len + i
        if i >= end:
            a[pos] = b[pos] = MASK
        elif i >= start:
            if i in revealed:
                b[pos], lb[pos] = MASK, True
            else:
                a[pos], la[pos] = MASK, True
    return a, b, la, lb


@pytest.mark.parametrize("seed", range(20))
def test_trajectory_views_match_the_reference(seed):
    rng = random.Random(seed)
    batch, prompt_len, r = rng.randint(1, 6), rng.randint(1, 8), rng.randint(4, 40)
    k = rng.randint(1, r)
    clean = torch.randint(10, 100, (batch, prompt_len + r))
    # block-wise teacher orders with several tokens per step now and then
    steps = torch.stack([torch.tensor(sorted(rng.sample(range(3 * r), r))) for _ in range(batch)])
    steps = torch.stack([s[torch.randperm(r)] for s in steps])
    t = torch.rand(batch)
    g = torch.Generator().manual_seed(seed)
    v = trajectory_views(clean, steps, prompt_len, k, t, MASK, g)
    for i in range(batch):
        start, end = v.window[i].tolist()
        assert 0 <= start < end <= r and start % k == 0 and end - start <= k
        a, b, la, lb = reference(clean[i].tolist(), steps[i].tolist(), prompt_len, k, float(t[i]), start, end)
        assert v.inputs[i].tolist() == a and v.inputs_rev[i].tolist() == b
        assert v.loss_mask[i].tolist() == la and v.loss_mask_rev[i].tolist() == lb
        window = torch.zeros(prompt_len + r, dtype=torch.bool)
        window[prompt_len + start: prompt_len + end] = True
        # the two views supervise every window slot exactly once, and nothing else
        assert torch.equal(v.loss_mask[i] ^ v.loss_mask_rev[i], window)
        assert not bool((v.loss_mask[i] & v.loss_mask_rev[i]).any())
        assert v.inputs[i, :prompt_len + start].tolist() == clean[i, :prompt_len + start].tolist()


def test_mask_ratio_moves_the_snapshot():
    clean = torch.arange(10, 30)[None]
    steps = torch.arange(16)[None]  # left to right
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    low = trajectory_views(clean, steps, 4, 16, torch.tensor([0.0]), MASK, g())
    high = trajectory_views(clean, steps, 4, 16, torch.tensor([1.0]), MASK, g())
    assert int(low.loss_mask.sum()) == 0 and int(high.loss_mask.sum()) == 16


def test_random_fallback_keeps_windows_and_complement():
    clean = torch.randint(10, 100, (8, 30))
    v = random_views(clean, 6, 8, torch.full((8,), 0.5), MASK, torch.Generator().manual_seed(1))
    for i in range(8):
        start, end = v.window[i].tolist()
        window = torch.zeros(30, dtype=torch.bool)
        window[6 + start: 6 + end] = True
        assert torch.equal(v.loss_mask[i] ^ v.loss_mask_rev[i], window)


def test_bad_window_is_refused():
    with pytest.raises(ValueError, match="window_size=50"):
        trajectory_views(torch.zeros(1, 20, dtype=torch.long), torch.zeros(1, 16, dtype=torch.long), 4, 50,
                         torch.zeros(1), MASK)
