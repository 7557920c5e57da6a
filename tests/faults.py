"""Test-only fault injection for Ray Train workers (production code only offers the ``hooks`` extension point).

``pipelines.distill.run_distill(cfg, hooks=...)`` calls ``hooks.on_start(rank, world)`` and
``hooks.on_step(step, rank, world)`` in every worker after every optimizer step. The hooks here kill a
worker hard (``os._exit``), once: a marker file records that the fault fired, so the restarted worker
group runs through.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


def ship_by_value() -> None:
    """Ray workers cannot import this tests-only module: pickle its classes by value."""
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class KillWorker:
    """Exit worker ``rank`` (default: the last) hard right after ``step``, once."""

    step: int
    marker: str
    rank: int = -1
    delay_s: float = 0.0  # wait before exiting (0: sooner than Ray's controller registers a fresh checkpoint)

    def on_step(self, step: int, rank: int, world: int) -> None:
        if step != self.step or rank != (self.rank % world):
            return
        marker = Path(self.marker)
        if marker.exists():
            return
        marker.write_text(f"killed rank {rank} after step {step}\n")
        if self.delay_s:
            time.sleep(self.delay_s)
        os._exit(1)


@dataclass(frozen=True)
class SlowStart:
    """Worker ``rank`` reaches the dataset ``seconds`` late: another worker asks for rows first."""

    seconds: float
    rank: int = 0

    def on_start(self, rank: int, world: int) -> None:
        if rank == self.rank:
            time.sleep(self.seconds)


@dataclass(frozen=True)
class SlowSteps:
    """Sleep ``seconds`` after every step on ``rank``: a worker slowed by a loaded machine."""

    seconds: float
    rank: int = 0

    def on_step(self, step: int, rank: int, world: int) -> None:
        if rank == self.rank:
            time.sleep(self.seconds)


@dataclass(frozen=True)
class Both:
    """Two hooks at once."""

    first: object
    second: object

    def on_start(self, rank: int, world: int) -> None:
        for hook in (self.first, self.second):
            if hasattr(hook, "on_start"):
                hook.on_start(rank, world)

    def on_step(self, step: int, rank: int, world: int) -> None:
        for hook in (self.first, self.second):
            if hasattr(hook, "on_step"):
                hook.on_step(step, rank, world)
