"""A dispatch-mode spy for the aten ops that read device data on the host (each one a sync on a GPU)."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """Records, in ``seen``, every aten op that reads device data on the host."""

    READS = ("_local_scalar_dense", "nonzero", "is_nonzero", "masked_select", "item", "equal")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.READS:
            self.seen.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))
