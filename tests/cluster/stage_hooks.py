"""Worker hooks for the multi-node distillation tests (``run_distill(cfg, hooks=...)``), shipped by value.

``PauseOnce`` holds every rank right after a chosen step, once, so that the test can remove a node
at a known point: the checkpoint of that step is in storage and no later one exists. ``RecordNode``
writes which node each rank ran on to the run's object store (the hooks see the same S3 the
pipeline writes to).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


def ship_by_value() -> None:
    """Ray workers cannot import this tests-only module: pickle its classes by value."""
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class PauseOnce:
    """After ``step``, every rank sleeps ``seconds`` (the first time only: ``marker`` records it)."""

    step: int
    marker: str  # a local path (every node of the test cluster is this machine)
    seconds: float = 120.0

    def on_step(self, step: int, rank: int, world: int) -> None:
        if step != self.step:
            return
        marker = Path(f"{self.marker}.rank{rank}")
        if marker.exists():
            return
        marker.write_text(f"rank {rank} paused after step {step}\n")
        time.sleep(self.seconds)


@dataclass(frozen=True)
class RecordNode:
    """Every rank writes its Ray node id to ``uri/rank-<rank>-attempt-<n>`` when it starts."""

    uri: str

    def on_start(self, rank: int, world: int) -> None:
        import fsspec
        import ray

        fs, root = fsspec.core.url_to_fs(self.uri)
        attempt = len(fs.glob(f"{root}/rank-{rank}-attempt-*")) if fs.exists(root) else 0
        fs.pipe_file(f"{root}/rank-{rank}-attempt-{attempt}", ray.get_runtime_context().get_node_id().encode())
