"""The decode step's traffic between host and device, behind one small interface.

A step makes exactly two transfers: its packed host arrays go to the device in one copy, and its
decisions come back in one copy, the step's only synchronisation. :class:`HostLink` is everything
in the engine that needs the CUDA runtime for that (pinned staging memory, non-blocking copies, an
event to wait on); the rest of the engine only launches kernels. The fake-CUDA dry run
(:mod:`d3core.perf.dryrun`) swaps in a link that moves no data, since fake tensors have none.
"""

from __future__ import annotations

import numpy as np
import torch

STAGING_MIN = 1 << 16  # int64 elements of the first pinned staging buffer


class HostLink:
    """Host-to-device uploads and device-to-host reads of one decoder's steps."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._staging: torch.Tensor | None = None

    def to_device(self, flat: np.ndarray, into: torch.Tensor | None = None) -> torch.Tensor:
        """``flat`` (int64) on the device: copied into ``into[:len(flat)]`` when given (a graph's static
        buffer), else into a new tensor. CUDA copies are non-blocking from a reused pinned buffer."""
        host = torch.from_numpy(flat)
        if self.device.type == "cuda":
            if self._staging is None or self._staging.numel() < flat.size:
                self._staging = torch.empty(max(flat.size, STAGING_MIN), dtype=torch.long, pin_memory=True)
            staged = self._staging[: flat.size]
            staged.copy_(host)
            host = staged
        if into is not None:
            into[: flat.size].copy_(host, non_blocking=True)
            return into
        if self.device.type != "cpu":
            return host.to(self.device, non_blocking=True)
        return host

    def to_host(self, out: torch.Tensor) -> np.ndarray:
        """The step's one device-to-host read (non-blocking into pinned memory, then one event wait, on CUDA)."""
        if out.device.type == "cuda":
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            event.synchronize()
            return host.numpy()
        return out.cpu().numpy()
