"""Per-op FLOPs and bytes of a region of code, and the rooflines they imply on a given GPU.

:class:`OpCosts` is a dispatch mode that records, for every aten op, its FLOPs (torch's own
``flop_registry``, the formulas :class:`~torch.utils.flop_counter.FlopCounterMode` uses) and the
bytes it reads and writes (``torch.utils._runtime_estimation.get_num_bytes`` of its inputs and
outputs, as torch's ``RuntimeEstimator`` roofline mode counts them; views and tensor factories
move no bytes). Bytes are also split by what they are: model weights, the KV cache, logit-sized
tensors (last dimension = vocabulary) and the rest (activations). It works on real and fake tensors.

Two projections come from the record, each labelled as a projection:

* **step roofline**: ``max(FLOPs / peak, bytes / bandwidth)`` over the whole region, with bytes
  the *fused minimum* (every weight, cache and logit byte moved once): what an ideal kernel set
  would take;
* **op roofline**: ``sum over ops of max(op FLOPs / peak, op bytes / bandwidth)``: torch's
  ``RuntimeEstimator`` cost model (without its 75% derating), i.e. eager kernels replayed back to
  back with no fusion and no launch gaps, which is what a captured decode graph runs.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._runtime_estimation import _IGNORE_OPS, get_num_bytes
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

from d3core.perf.devices import DeviceSpec

aten = torch.ops.aten
KINDS = ("weights", "kv", "logits", "activations")
GATHERS = frozenset({"index_select", "embedding", "index", "gather"})  # read the output's rows of the source
# Ops whose float inputs must share one dtype on a GPU (fake tensors do not check it).
MATMULS = frozenset({"mm", "addmm", "bmm", "baddbmm", "matmul", "scaled_dot_product_attention", "linear"})
SCATTERS = frozenset({"index_copy_", "index_copy", "index_put_", "index_put", "scatter_", "scatter"})


@dataclass
class CostRecord:
    flops: float = 0.0
    bytes: dict[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    op_roofline_s: dict[str, float] = field(default_factory=dict)  # device name -> seconds
    ops: int = 0

    @property
    def total_bytes(self) -> float:
        return sum(self.bytes.values())

    def step_roofline_s(self, device: DeviceSpec, fused_bytes: float) -> float:
        return max(self.flops / device.bf16_flops, fused_bytes / device.bandwidth)


class OpCosts(TorchDispatchMode):
    """Records FLOPs and classified bytes of every op run inside it (see the module docstring)."""

    def __init__(self, devices: dict[str, DeviceSpec], weights: list[torch.Tensor] = (),
                 cache: list[torch.Tensor] = (), vocab: int | None = None) -> None:
        super().__init__()
        self.devices = devices
        self._weights = {StorageWeakRef(t.untyped_storage()) for t in weights}
        self._cache = {StorageWeakRef(t.untyped_storage()) for t in cache}
        self.vocab = vocab
        self.record = CostRecord(op_roofline_s=dict.fromkeys(devices, 0.0))
        self.by_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # op -> [flops, bytes]
        self.devices_seen: set[str] = set()  # every device a tensor of an op lived on

    def _kind(self, t: torch.Tensor) -> str:
        ref = StorageWeakRef(t.untyped_storage())
        if ref in self._weights:
            return "weights"
        if ref in self._cache:
            return "kv"
        if self.vocab is not None and t.dim() and t.shape[-1] == self.vocab:
            return "logits"
        return "activations"

    @staticmethod
    def _traffic(name: str, args, kwargs, out):
        """``(tensor, bytes)`` each op reads or writes. A gather reads only the rows it gathers, and a
        scatter writes only the rows it scatters, not the whole tensor they index."""
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if name in GATHERS and tensors and outs:
            src = tensors[0]
            yield src, float(get_num_bytes(outs[0])) * src.element_size() / max(outs[0].element_size(), 1)
            for t in tensors[1:] + outs:
                yield t, float(get_num_bytes(t))
            return
        if name in SCATTERS and tensors:
            dest, rest = tensors[0], tensors[1:]
            values = [t for t in rest if t.dtype == dest.dtype] or rest
            yield dest, float(sum(get_num_bytes(t) for t in values)) if values else 0.0
            for t in rest:
                yield t, float(get_num_bytes(t))
            return
        for t in tensors + outs:
            yield t, float(get_num_bytes(t))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet.__name__ in MATMULS:
            floats = {t.dtype for t in pytree.tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 1}
            if len(floats) > 1:
                raise TypeError(f"aten.{packet.__name__} mixes dtypes {sorted(map(str, floats))}: on a GPU it fails; "
                                "cast the operands to one dtype")
        if packet is aten.scaled_dot_product_attention:  # one fused kernel on a GPU (flash / memory-efficient)
            out = func(*args, **kwargs)
            q, k, v = args[:3]
            self._add(packet.__name__, sdpa_flop_count(q.shape, k.shape, v.shape),
                      self._traffic(packet.__name__, args, kwargs, out))
            return out
        if func is torch.ops.prim.device.default:
            return func(*args, **kwargs)
        if packet not in flop_registry:
            # a composite op (linear, reshape): count the ops it is made of, as FlopCounterMode does
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if packet in _IGNORE_OPS or func.is_view:
            return out
        flops = float(flop_registry[packet](*args, **kwargs, out_val=out)) if packet in flop_registry else 0.0
        self._add(packet.__name__, flops, self._traffic(packet.__name__, args, kwargs, out))
        return out

    def _add(self, name: str, flops: float, traffic) -> None:
        moved = 0.0
        for t, n in traffic:
            self.record.bytes[self._kind(t)] += n
            moved += n
            if t.dim():  # a 0-dim tensor (a Python scalar's) may live anywhere
                self.devices_seen.add(str(t.device))
        rec = self.record
        rec.flops += flops
        rec.ops += 1
        self.by_op[name][0] += flops
        self.by_op[name][1] += moved
        for device, spec in self.devices.items():
            rec.op_roofline_s[device] += max(flops / spec.bf16_flops, moved / spec.bandwidth)
