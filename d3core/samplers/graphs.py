"""CUDA graphs for the device part of segment steps, one per bucketed step shape.

A step's device part (packed-window forward, token statistics, commit rule) launches a few
hundred kernels; replaying a captured graph launches them in one call. Bucketed packing gives
each step a shape from a small set; the first step of a shape warms up and is captured into a
graph whose inputs are views of one static device buffer. Later steps of that shape copy their
packed arrays into the buffer (one non-blocking copy) and replay. Graphs share one memory pool;
the least recently used is dropped beyond ``max_graphs``.

The runner's semantics are the backend's: :class:`CudaGraphs` records real CUDA graphs,
:class:`~d3core.samplers.replay.EmulatedGraphs` records the same kernels on any device and
replays them on the same memory, so the CPU test suite checks this runner against eager steps.

Which mode a :class:`~d3core.samplers.engine.Decoder` uses (``graphs=None``) comes from
:func:`default_mode`: ``$D3RAY_GRAPHS`` (``auto``, ``off``, ``cuda``, ``emulate``) or the
:func:`graph_mode` context, ``auto`` meaning CUDA graphs on CUDA devices and none elsewhere.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from typing import Callable, Iterator

import torch

from d3core.samplers.packing import Packer
from d3core.samplers.plan import HostStep, StepSpec

logger = logging.getLogger(__name__)

MODES = ("auto", "off", "cuda", "emulate")
MODE_ENV = "D3RAY_GRAPHS"
_mode_override: str | None = None


def _check_mode(mode: str, source: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{source}={mode!r}: must be one of {MODES} (auto: CUDA graphs on CUDA devices)")
    return mode


def default_mode() -> str:
    """The process-wide graph mode: the innermost :func:`graph_mode`, else ``$D3RAY_GRAPHS``, else ``auto``."""
    if _mode_override is not None:
        return _mode_override
    return _check_mode(os.environ.get(MODE_ENV, "auto").strip().lower() or "auto", MODE_ENV)


@contextlib.contextmanager
def graph_mode(mode: str) -> Iterator[None]:
    """Decoders built inside use ``mode`` (process-wide, so decode threads see it too)."""
    global _mode_override
    previous, _mode_override = _mode_override, _check_mode(mode, "graph_mode")
    try:
        yield
    finally:
        _mode_override = previous


def resolve(graphs: bool | str | None, device: torch.device) -> str:
    """``off``, ``cuda`` or ``emulate`` for a decoder's ``graphs`` argument on ``device``."""
    if graphs is None:
        graphs = default_mode()
    if graphs is True:
        graphs = "cuda"
    if graphs is False:
        graphs = "off"
    mode = _check_mode(graphs, "graphs")
    if mode == "auto":
        return "cuda" if device.type == "cuda" else "off"
    if mode == "cuda" and device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, got {device}: run eagerly (graphs=False) or emulate "
                         "them (graphs='emulate')")
    return mode


class CudaGraphs:
    """Real CUDA graphs: warm-up on a side stream, capture into one shared memory pool."""

    name = "cuda"

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()

    def empty(self, size: int, device: torch.device) -> torch.Tensor:
        return torch.empty(size, dtype=torch.long, device=device)

    def capture(self, fn: Callable[[], torch.Tensor], warmup: int) -> tuple[Callable[[], None], torch.Tensor]:
        # Warm-up runs recompute the same window in place: idempotent, so the step's effect is unchanged.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        return graph.replay, out


def backend(mode: str):
    if mode == "cuda":
        return CudaGraphs()
    if mode == "emulate":
        from d3core.samplers.replay import EmulatedGraphs

        return EmulatedGraphs()
    raise ValueError(f"graph mode {mode!r} has no capture backend: use 'cuda' or 'emulate'")


class _Entry:
    def __init__(self, buffer: torch.Tensor, replay: Callable[[], None], out: torch.Tensor) -> None:
        self.buffer, self.replay, self.out = buffer, replay, out


class GraphRunner:
    """Runs ``device_fn(buffer, spec) -> Tensor`` for a packed step, replaying a captured graph per spec.

    The device function sees nothing of the step but its static buffer and the host-only
    :class:`~d3core.samplers.packing.StepSpec`: every input it reads is a view of the buffer or made
    from one inside the captured region, so a replay after the buffer's refresh reads this step's
    data. The buffer and the output live as long as their entry."""

    def __init__(self, packer: Packer, device_fn: Callable[[torch.Tensor, StepSpec], torch.Tensor],
                 mode: str = "cuda", max_graphs: int = 64, warmup: int = 2) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs={max_graphs}: must be >= 1")
        self.packer, self.device_fn = packer, device_fn
        self.backend = backend(mode)
        self.max_graphs, self.warmup = max_graphs, warmup
        self.graphs: collections.OrderedDict[StepSpec, _Entry] = collections.OrderedDict()
        self.captures = 0
        self.replays = 0

    def run(self, step: HostStep) -> torch.Tensor:
        spec = step.spec
        entry = self.graphs.get(spec)
        if entry is None:
            entry = self._capture(step, spec)
        else:
            self.graphs.move_to_end(spec)
            self.packer.upload(step.parts, into=entry.buffer)
            entry.replay()
            self.replays += 1
        return entry.out

    def _capture(self, step: HostStep, spec: StepSpec) -> _Entry:
        buffer = self.backend.empty(spec.size, self.packer.device)
        self.packer.upload(step.parts, into=buffer)
        device_fn = self.device_fn
        replay, out = self.backend.capture(lambda: device_fn(buffer, spec), self.warmup)
        replay()  # capture records without running: this is the step itself
        self.captures += 1
        entry = _Entry(buffer, replay, out)
        self.graphs[spec] = entry
        if len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        logger.debug("captured a decode graph for %s (%d held)", spec.shape, len(self.graphs))
        return entry
