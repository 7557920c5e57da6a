"""CUDA graphs for the device part of segment steps, one per bucketed :class:`~d3core.samplers.packing.Shape`.

A step's device part (packed-window forward, token statistics, commit rule) launches a few
hundred kernels; replaying a captured graph launches them in one call. Bucketed packing gives
each step a shape from a small set; the first step of a shape warms up on a side stream and is
captured into a graph whose inputs are views of one static device buffer. Later steps of that
shape copy their packed arrays into the buffer (one non-blocking copy) and replay. Graphs share
one memory pool; the least recently used is dropped beyond ``max_graphs``.

Nothing the device part does depends on host state beyond the shape: no torch RNG (sampling
noise is counter-based), no host reads, in-place cache writes at indices from the buffer.
"""

from __future__ import annotations

import collections
import logging
from typing import Callable

import numpy as np
import torch

from d3core.samplers.packing import HostStep, Packer, Shape, StepMeta, segment_meta

logger = logging.getLogger(__name__)


class _Entry:
    def __init__(self, buffer: torch.Tensor, graph: torch.cuda.CUDAGraph, out: torch.Tensor) -> None:
        self.buffer, self.graph, self.out = buffer, graph, out


class GraphRunner:
    """Runs ``device(meta) -> Tensor`` for a packed step, replaying a captured graph per shape."""

    def __init__(self, packer: Packer, device_fn: Callable[[StepMeta], torch.Tensor], max_graphs: int = 64,
                 warmup: int = 2) -> None:
        if packer.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {packer.device}: run eagerly (graphs=False)")
        if max_graphs < 1:
            raise ValueError(f"max_graphs={max_graphs}: must be >= 1")
        self.packer, self.device_fn = packer, device_fn
        self.max_graphs, self.warmup = max_graphs, warmup
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: collections.OrderedDict[Shape, _Entry] = collections.OrderedDict()
        self.captures = 0
        self.replays = 0

    def run(self, step: HostStep) -> torch.Tensor:
        entry = self.graphs.get(step.shape)
        if entry is None:
            entry = self._capture(step)
        else:
            self.graphs.move_to_end(step.shape)
            self.packer.upload(step.parts, into=entry.buffer)
            entry.graph.replay()
            self.replays += 1
        return entry.out

    def _capture(self, step: HostStep) -> _Entry:
        size = sum(np.asarray(a).size for a in step.parts.values())
        buffer = torch.empty(size, dtype=torch.long, device=self.packer.device)
        views = self.packer.upload(step.parts, into=buffer)
        meta = segment_meta(views, step.shape, self.packer.device)
        # Warm-up runs recompute the same window in place: idempotent, so the step's effect is unchanged.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.device_fn(meta)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.device_fn(meta)
        graph.replay()  # capture records without running: this is the step itself
        self.captures += 1
        entry = _Entry(buffer, graph, out)
        self.graphs[step.shape] = entry
        if len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        logger.debug("captured a decode graph for %s (%d held)", step.shape, len(self.graphs))
        return entry
