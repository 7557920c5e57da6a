"""CUDA-graph semantics on any device: record a step's kernels once, replay them on the same memory.

A CUDA graph records the kernels a callable launches, with the addresses of every tensor they
read and write, and a replay relaunches exactly those kernels on exactly that memory. Python
does not run again: whatever the callable computed on the host, or made into a tensor before
the capture, is frozen at its capture-time value. :class:`EmulatedGraphs` gives the same
semantics on the CPU so that the test suite can hold graph replay against eager decoding on a
machine with no GPU:

* **capture** runs the callable once under a dispatch mode that records every aten op with its
  argument and output tensors (the emulator's kernels and addresses);
* **replay** reruns the recorded ops in order on those same tensor objects: an op that made a
  fresh tensor at capture has its new result copied into the recorded one (the graph's fixed
  output address), in-place ops and views act on the recorded storage again.

So a tensor derived from step data *outside* the capture (a mask built before it, a ``.bool()``
copy of an input view) keeps its first step's value on every replay, exactly as on a GPU, and a
host read inside the capture (``.item()``, ``nonzero``) fails here as it does under
``torch.cuda.graph``. Nothing in the emulator knows about decoding: it checks the runner.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

logger = logging.getLogger(__name__)

aten = torch.ops.aten

# Ops that read device data on the host or size their output by it: a sync, not capturable on a GPU.
HOST_READS = frozenset({"_local_scalar_dense", "item", "nonzero", "is_nonzero", "masked_select", "equal",
                        "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim"})


class CaptureError(RuntimeError):
    """A captured step did something a CUDA graph cannot hold (a host read)."""


class _Recorder(TorchDispatchMode):
    """Runs ops as they come and keeps ``(op, args, kwargs, out)`` of each, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, tuple, dict, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name in HOST_READS or (name == "index" and _bool_index(args)):
            raise CaptureError(f"aten.{name} reads device data on the host inside a captured step: a CUDA graph "
                               "cannot capture it; compute it on the host before the step or keep it on the device")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


def _bool_index(args: tuple) -> bool:
    """``x[mask]`` with a boolean mask sizes its output by the mask's contents."""
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class Replay:
    """The recorded ops of one capture; calling it relaunches them on the recorded tensors."""

    def __init__(self, ops: list[tuple[Any, tuple, dict, Any]]) -> None:
        self.ops = ops

    def __len__(self) -> int:
        return len(self.ops)

    def __call__(self) -> None:
        for func, args, kwargs, recorded in self.ops:
            fresh = func(*args, **kwargs)
            for old, new in zip(pytree.tree_leaves(recorded), pytree.tree_leaves(fresh)):
                if isinstance(old, torch.Tensor) and new is not old and not _same_memory(old, new):
                    old.copy_(new)  # the graph's output address keeps the op's output


class EmulatedGraphs:
    """The capture backend of :class:`~d3core.samplers.graphs.GraphRunner` with CUDA-graph semantics, on any device."""

    name = "emulated"

    def empty(self, size: int, device: torch.device) -> torch.Tensor:
        return torch.empty(size, dtype=torch.long, device=device)

    def capture(self, fn: Callable[[], torch.Tensor], warmup: int) -> tuple[Callable[[], None], torch.Tensor]:
        """Warm up eagerly, then record one run; the caller replays it to run the step (as after a CUDA capture)."""
        for _ in range(warmup):
            fn()
        recorder = _Recorder()
        with recorder:
            out = fn()
        logger.debug("emulated capture: %d ops", len(recorder.ops))
        return Replay(recorder.ops), out
