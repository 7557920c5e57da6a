"""``benchmarks/hotpath.py``'s sync counter: what it counts, what it leaves out, and in-forward attribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmark_module import load_benchmark


@pytest.fixture(scope="module")
def hotpath():
    return load_benchmark("hotpath")


class _Model(torch.nn.Module):
    def forward(self, x):
        return x * float(x.sum())  # one host read inside the forward


def test_host_reads_and_uploads_are_counted_but_empty_uploads_are_not(hotpath):
    x = torch.arange(4.0)
    with hotpath.SyncCounter() as sync:
        x.sum().item()
        x.tolist()
        bool(x.any())
        x[x > 1]
        torch.tensor([1, 2], device="cpu")
        torch.as_tensor(np.arange(3), device="cpu")
        counted = sync.total
        torch.tensor([], device="cpu")  # zero elements: nothing is copied
        torch.as_tensor(np.zeros(0), device="cpu")
        torch.tensor([1, 2])  # no device: stays on the host
        x + 1
    assert counted == 6 and sync.total == 6 and sync.in_forward == 0


def test_reads_inside_the_forward_are_attributed_to_it(hotpath):
    model, x = _Model(), torch.arange(3.0)
    with hotpath.SyncCounter() as sync, sync.forward_scope(_Model):
        model(x)
        x.max().item()
    assert (sync.total, sync.in_forward) == (2, 1)
    assert _Model.forward is not None and "wrapped" not in _Model.forward.__name__  # the scope is undone
