"""Distillation losses and curricula."""

from __future__ import annotations

import math

import pytest
import torch

from d3core.distill.losses import (
    LossWeights,
    certainty_entropy,
    distill_loss,
    mask_ratio_bounds,
    masked_ce,
    window_size,
)


def test_masked_ce_only_counts_supervised_slots():
    logits = torch.tensor([[[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]]])
    targets = torch.tensor([[0, 0, 1]])
    only_first = masked_ce(logits, targets, torch.tensor([[True, False, False]]))
    assert math.isclose(float(only_first), -math.log(math.exp(5) / (math.exp(5) + 1)), rel_tol=1e-5)
    assert float(masked_ce(logits, targets, torch.zeros(1, 3, dtype=torch.bool))) == 0.0


def test_certainty_entropy_ignores_wrong_argmax_and_sharpens_with_temperature():
    logits = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    targets = torch.tensor([[0, 0]])  # slot 1 is wrong: excluded
    mask = torch.tensor([[True, True]])
    h_half = certainty_entropy(logits, targets, mask, 0.5)
    p = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    assert math.isclose(float(h_half), float(-(p * p.log()).sum()), rel_tol=1e-5)
    assert certainty_entropy(logits, targets, mask, 1.0) > h_half


def test_distill_loss_parts_and_gradient():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    logits_rev = torch.randn(2, 5, 7, requires_grad=True)
    targets = torch.randint(0, 7, (2, 5))
    mask = torch.rand(2, 5) > 0.5
    parts = distill_loss(logits, logits_rev, targets, mask, ~mask, LossWeights())
    expected = (parts["ce"] + parts["ce_rev"] + 2.0 * parts["ent"]) * 0.25
    assert torch.allclose(parts["loss"], expected)
    parts["loss"].backward()
    assert logits.grad is not None and logits_rev.grad is not None
    no_rev = distill_loss(logits, None, targets, mask, None, LossWeights(complementary=False))
    assert "ce_rev" not in no_rev


def test_curricula():
    assert mask_ratio_bounds(0, 100) == (0.0, 0.8)
    assert mask_ratio_bounds(50, 100) == pytest.approx((0.4, 0.8))
    assert mask_ratio_bounds(500, 100) == pytest.approx((0.8, 0.8))
    sizes = [16, 16, 24, 24, 32, 32]
    assert [window_size(e, sizes) for e in (0, 1.5, 2, 3.5, 5.9)] == [16, 20, 24, 28, 32]
    with pytest.raises(ValueError, match="sizes is empty"):
        window_size(0, [])
    with pytest.raises(ValueError, match="entropy_temperature=0"):
        LossWeights(entropy_temperature=0)
