"""Confidence intervals by bootstrap: accuracy of one cell, AUP of each system, and paired AUP differences.

Every cell of a task decodes the same examples in the same order, so one resample of example
indices applies to all of them at once (a *paired* bootstrap): a replicate recomputes every
cell's accuracy and TPF (generated tokens / NFE over the resampled examples), the task's y_max,
and every system's AUP. Two systems are *within noise* when the 95% interval of their AUP
difference over the replicates contains 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Mapping, Sequence

import numpy as np

from d3core.eval.aup import ALPHA, MAX_DROP, Point, aup

ITERATIONS = 1000
LEVEL = 0.95
SEED = 0


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return float(lo), float(hi)


def _check(iters: int, level: float) -> None:
    if iters < 1:
        raise ValueError(f"iters={iters}: the bootstrap needs at least one resample (1000 is usual)")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level}: a confidence level lies strictly between 0 and 1 (e.g. 0.95)")


def _indices(n: int, iters: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(iters, n))


def bootstrap_ci(correct: Sequence[bool], iters: int = ITERATIONS, level: float = LEVEL,
                 seed: int = SEED) -> tuple[float, float]:
    """The ``level`` percentile-bootstrap interval of the mean of ``correct`` (a fraction in [0, 1])."""
    _check(iters, level)
    values = np.asarray(correct, dtype=float)
    if values.size == 0:
        raise ValueError("correct is empty: a confidence interval needs at least one example")
    return _percentiles(values[_indices(values.size, iters, seed)].mean(axis=1), level)


@dataclass(frozen=True)
class PointSamples:
    """One cell's per-example outcomes: correctness, generated tokens and NFE (same example order in all cells)."""

    correct: np.ndarray
    generated: np.ndarray
    nfe: np.ndarray
    unit_tpf: bool = False  # counted at TPF 1 (single-point decoders, the vanilla anchor)

    @classmethod
    def of(cls, correct, generated, nfe, unit_tpf: bool = False) -> "PointSamples":
        arrays = [np.asarray(a, dtype=float) for a in (correct, generated, nfe)]
        if len({a.size for a in arrays}) != 1 or arrays[0].size == 0:
            raise ValueError(f"correct/generated/nfe have sizes {[a.size for a in arrays]}: need one value per "
                             "example, at least one example")
        return cls(*arrays, unit_tpf=unit_tpf)


@dataclass(frozen=True)
class AUPNoise:
    """Bootstrap intervals of every system's AUP on one task and the pairs within noise of each other."""

    ci: dict[str, tuple[float, float]]
    within_noise: list[tuple[str, str]]
    difference_ci: dict[tuple[str, str], tuple[float, float]]
    iters: int
    level: float


def _replicate_points(samples: PointSamples, idx: np.ndarray) -> list[tuple[float, float]]:
    acc = 100.0 * samples.correct[idx].mean(axis=1)
    if samples.unit_tpf:
        tpf = np.ones(len(idx))
    else:
        tpf = samples.generated[idx].sum(axis=1) / np.maximum(samples.nfe[idx].sum(axis=1), 1.0)
    return list(zip(tpf.tolist(), acc.tolist()))


def aup_noise(systems: Mapping[str, Sequence[PointSamples]], iters: int = ITERATIONS, level: float = LEVEL,
              seed: int = SEED, alpha: float = ALPHA, max_drop: float = MAX_DROP) -> AUPNoise:
    """Paired-bootstrap intervals of each system's AUP on one task, and which pairs are within noise."""
    _check(iters, level)
    sizes = {s.correct.size for pts in systems.values() for s in pts}
    if len(sizes) != 1:
        raise ValueError(f"cells of one task have {sorted(sizes)} examples: a paired bootstrap needs the same "
                         "examples in every cell")
    idx = _indices(sizes.pop(), iters, seed)
    per = {name: [_replicate_points(s, idx) for s in pts] for name, pts in systems.items()}
    values = {name: np.zeros(iters) for name in systems}
    for b in range(iters):
        points = {name: [pts[b] for pts in cells] for name, cells in per.items()}
        y_max = max(acc for pts in points.values() for _, acc in pts)
        for name, pts in points.items():
            usable = [Point(t, a) for t, a in pts if math.isfinite(t) and t > 0]
            values[name][b] = aup(usable, y_max, alpha, max_drop, warn_units=False) if usable and y_max > 0 else 0.0
    ci = {name: _percentiles(v, level) for name, v in values.items()}
    diffs, within = {}, []
    for a, b in combinations(systems, 2):
        lo, hi = _percentiles(values[a] - values[b], level)
        diffs[(a, b)] = (lo, hi)
        if lo <= 0.0 <= hi:
            within.append((a, b))
    return AUPNoise(ci, within, diffs, iters, level)
