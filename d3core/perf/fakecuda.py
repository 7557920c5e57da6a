"""Fake CUDA tensors on a CPU-only build: ``device="cuda"`` shapes, dtypes and devices with no memory behind them.

PyTorch's :class:`~torch._subclasses.fake_tensor.FakeTensorMode` runs every aten op on fake tensors.
Two things in a CPU-only build still reach for the CUDA runtime, and :func:`fake_cuda` works around
both, so that the decode engine's own code runs unchanged at 8B shape on this machine:

* Python indexing (``t[a:b]``, ``t[idx] = v``), ``~t``, ``t.copy_`` and ``t.contiguous()`` build a
  CUDA device guard in their C++ bindings, which a CPU-only build does not have. Inside
  :func:`fake_cuda`, these on CUDA tensors are routed through the equivalent aten ops (``slice``,
  ``select``, ``unsqueeze``, ``index``, ``index_put_``, ``bitwise_not``, ``copy_``, ``clone``),
  which the fake mode handles. Basic indexing and one group of adjacent tensor indices are
  supported, which is everything the engine uses.
* Autograd's engine also builds a device guard, and aborts the process on a fake CUDA tensor: the
  training dry run (:mod:`d3core.perf.train_dryrun`) therefore runs on fake CPU tensors.

The engine's host-device traffic (pinned memory, events) sits behind
:class:`~d3core.samplers.transfer.HostLink`; the dry run replaces it with :class:`DryLink`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from d3core.samplers.transfer import HostLink

aten = torch.ops.aten
_ORIGINAL = {name: getattr(torch.Tensor, name) for name in
             ("__getitem__", "__setitem__", "__invert__", "copy_", "contiguous")}


def _consumes(item: Any) -> bool:
    return item is not None and item is not Ellipsis


def _basic(t: torch.Tensor, index: Any) -> tuple[torch.Tensor, list[torch.Tensor | None] | None]:
    """``t`` after the basic part of ``index``, and the ``aten.index`` indices of its tensor part (or None)."""
    items = index if isinstance(index, tuple) else (index,)
    if sum(item is Ellipsis for item in items) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    out, dim, tensors = t, 0, {}
    for item in items:
        if item is None:
            out, dim = out.unsqueeze(dim), dim + 1
        elif item is Ellipsis:
            dim += t.dim() - sum(_consumes(i) for i in items)
        elif isinstance(item, slice):
            out = aten.slice.Tensor(out, dim, item.start, item.stop, 1 if item.step is None else item.step)
            dim += 1
        elif isinstance(item, (int, np.integer)):
            out = out.select(dim, int(item))
        elif isinstance(item, torch.Tensor):
            tensors[dim] = item
            dim += 1
        else:
            raise TypeError(f"fake_cuda indexing: unsupported index item {item!r}")
    if not tensors:
        return out, None
    dims = sorted(tensors)
    if dims != list(range(dims[0], dims[-1] + 1)):
        raise TypeError("fake_cuda indexing: tensor indices must be adjacent")
    return out, [tensors.get(d) for d in range(dims[-1] + 1)]


def _getitem(t: torch.Tensor, index: Any) -> torch.Tensor:
    if t.device.type != "cuda":
        return _ORIGINAL["__getitem__"](t, index)
    out, tensors = _basic(t, index)
    return out if tensors is None else aten.index.Tensor(out, tensors)


def _setitem(t: torch.Tensor, index: Any, value: Any) -> None:
    if t.device.type != "cuda":
        return _ORIGINAL["__setitem__"](t, index, value)
    out, tensors = _basic(t, index)
    if tensors is None:
        out.fill_(value) if not isinstance(value, torch.Tensor) else aten.copy_.default(out, value)
        return None
    if not isinstance(value, torch.Tensor):
        value = torch.full((1,), value, dtype=t.dtype, device=t.device)
    aten.index_put_(out, tensors, value.to(t.dtype))
    return None


def _invert(t: torch.Tensor) -> torch.Tensor:
    return torch.bitwise_not(t) if t.device.type == "cuda" else _ORIGINAL["__invert__"](t)


def _copy(t: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    if t.device.type == "cuda" or src.device.type == "cuda":
        return aten.copy_.default(t, src, non_blocking)
    return _ORIGINAL["copy_"](t, src, non_blocking)


def _contiguous(t: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    if t.device.type != "cuda":
        return _ORIGINAL["contiguous"](t, memory_format=memory_format)
    return t if t.is_contiguous(memory_format=memory_format) else aten.clone.default(t, memory_format=memory_format)


_SHIMS = {"__getitem__": _getitem, "__setitem__": _setitem, "__invert__": _invert, "copy_": _copy,
          "contiguous": _contiguous}


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeTensorMode]:
    """A fake mode in which ``device="cuda"`` tensors work (inference mode; the bindings above routed through aten)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    for name, shim in _SHIMS.items():
        setattr(torch.Tensor, name, shim)
    try:
        with mode, torch.inference_mode():
            yield mode
    finally:
        for name, method in _ORIGINAL.items():
            setattr(torch.Tensor, name, method)


class DryLink(HostLink):
    """A host link that moves no data: uploads become fake device buffers; nothing can be read back."""

    def to_device(self, flat: np.ndarray, into: torch.Tensor | None = None) -> torch.Tensor:
        if into is not None:
            return into
        return torch.empty(int(flat.size), dtype=torch.long, device=self.device)

    def to_host(self, out: torch.Tensor) -> np.ndarray:
        raise RuntimeError("a dry run computes no device values: script the step's decisions on the host instead")


def fake_model(arch: str, size: str, dtype: torch.dtype = torch.bfloat16, device: str = "cuda", **overrides):
    """An official-shape model with fake parameters on ``device`` (call inside :func:`fake_cuda`)."""
    from d3core.models.registry import build_model

    with unset_fake_temporarily(), torch.inference_mode(False):  # a plain meta model first: no memory
        model = build_model(arch, size, device="meta", dtype=dtype, **overrides)
    return model.to_empty(device=device).eval()
