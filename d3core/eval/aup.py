"""AUP (Accuracy Under Parallelism), exactly as d3LLM defines it.

For one system on one task the inputs are points ``(rho_i, y_i)``: rho is TPF (generated
tokens per model forward) and y the accuracy in percent. The points are sorted by rho, only
those with ``y >= y_1 - max_drop`` are kept (``y_1`` is the accuracy at the lowest rho), and

    AUP = rho_1 * y_1 + 1/2 * sum_{i>=2} (rho_i - rho_{i-1}) * (y_i W(y_i) + y_{i-1} W(y_{i-1}))
    W(y) = min(exp(-alpha * (1 - y / y_max)), 1)

with ``alpha = 3`` and ``y_max`` the best accuracy of any system (AR baselines included) on
the task. The first term is not weighted, so a single point at rho = 1 scores its accuracy.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

logger = logging.getLogger(__name__)

ALPHA = 3.0
MAX_DROP = 5.0


@dataclass(frozen=True)
class Point:
    """One operating point: TPF and accuracy in percent (0-100)."""

    tpf: float
    accuracy: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tpf) and self.tpf > 0):
            raise ValueError(f"tpf={self.tpf}: TPF must be a finite positive number (tokens per forward)")
        if not 0.0 <= self.accuracy <= 100.0:
            raise ValueError(f"accuracy={self.accuracy}: AUP takes accuracy in percent, within [0, 100]")


def _points(points: Iterable[Point | tuple[float, float]]) -> list[Point]:
    out = [p if isinstance(p, Point) else Point(float(p[0]), float(p[1])) for p in points]
    if not out:
        raise ValueError("points is empty: AUP needs at least one (tpf, accuracy) point")
    return out


def weight(y: float, y_max: float, alpha: float = ALPHA) -> float:
    """W(y) = min(exp(-alpha (1 - y / y_max)), 1): accuracy below the task's best is discounted."""
    if y_max <= 0:
        raise ValueError(f"y_max={y_max}: the best accuracy on a task must be positive to weight by it")
    return min(math.exp(-alpha * (1.0 - y / y_max)), 1.0)


def kept_points(points: Iterable[Point | tuple[float, float]], max_drop: float = MAX_DROP) -> list[Point]:
    """Points sorted by TPF with those more than ``max_drop`` points below the lowest-TPF accuracy removed."""
    pts = sorted(_points(points), key=lambda p: (p.tpf, -p.accuracy))
    floor = pts[0].accuracy - max_drop
    return [p for p in pts if p.accuracy >= floor]


def aup(
    points: Iterable[Point | tuple[float, float]], y_max: float, alpha: float = ALPHA, max_drop: float = MAX_DROP,
    warn_units: bool = True,
) -> float:
    """The AUP of one system's points on one task (accuracy in percent; see the module docstring).

    ``warn_units``: log when every accuracy is below 1 (a sign of fractions passed for percent);
    resampling code that knows its units turns it off.
    """
    pts = kept_points(points, max_drop)
    best = max(p.accuracy for p in pts)
    if best > y_max + 1e-9:
        raise ValueError(
            f"y_max={y_max} is below this system's accuracy {best}: y_max must be the best accuracy over every "
            "compared system on the task, this one included"
        )
    if best < 1.0 and warn_units:
        logger.warning("all accuracies are below 1: AUP takes percent (0-100), not fractions")
    score = pts[0].tpf * pts[0].accuracy
    for prev, cur in zip(pts, pts[1:]):
        score += 0.5 * (cur.tpf - prev.tpf) * (
            cur.accuracy * weight(cur.accuracy, y_max, alpha) + prev.accuracy * weight(prev.accuracy, y_max, alpha)
        )
    return score


def task_y_max(systems: Mapping[str, Sequence[Point | tuple[float, float]]]) -> float:
    """The best accuracy over every point of every system compared on a task."""
    values = [p.accuracy for pts in systems.values() for p in _points(pts)]
    if not values:
        raise ValueError("no systems given: y_max is taken over all systems compared on the task")
    return max(values)


def aup_by_system(
    systems: Mapping[str, Sequence[Point | tuple[float, float]]], alpha: float = ALPHA, max_drop: float = MAX_DROP
) -> dict[str, float]:
    """AUP of every system on one task, with the task-level y_max taken over all of them."""
    y_max = task_y_max(systems)
    return {name: aup(pts, y_max, alpha, max_drop) for name, pts in systems.items()}
