"""Host-side step plans packed into the device tensors of one decode step.

Every step the engine turns the rows' :class:`RowPlan` s into one flat int64 array (window
tokens, slots, attention and head indices, the logit-cell layout, the commit rule's per-row
parameters), copies it to the device in one transfer (pinned and non-blocking on CUDA) and
slices it into views. Nothing here reads device memory.

The logit cells of a step are laid out ``(n, NS, seg)``: row, segment (a block of ``seg``
consecutive slots whose logits are wanted), cell. Rows with fewer segments are padded; padded
cells are never candidates. A plan with an empty window (``start == end``) sits the step out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from d3core.cache import Windows

logger = logging.getLogger(__name__)


@dataclass
class RowPlan:
    """What one row asks of a step: recompute ``[start, end)``, attend to ``[0, keys)``, logits per segment."""

    start: int
    end: int
    keys: int
    segments: list[int] = field(default_factory=list)  # first slot of each logit segment
    flags: list[int] = field(default_factory=list)  # one sampler-defined flag per segment
    ints: tuple[int, ...] = ()  # per-row integer parameters of the commit rule
    floats: tuple[float, ...] = ()  # per-row float parameters of the commit rule
    temperature: float = 0.0

    @property
    def sits_out(self) -> bool:
        return self.end <= self.start


@dataclass(frozen=True)
class Cells:
    """The device view of one step's logit cells, ``(n, NS, seg)``, handed to a commit rule."""

    tokens: torch.Tensor
    conf: torch.Tensor
    logprob: torch.Tensor
    entropy: torch.Tensor | None
    cand: torch.Tensor  # bool: a masked slot the rule may commit
    flags: torch.Tensor  # (n, NS) long
    ints: torch.Tensor  # (n, k) long
    floats: torch.Tensor  # (n, k) float64
    uniform: torch.Tensor | None  # (n, NS, seg) float64 per-cell uniforms, when the program asks
    int_max: tuple[int, ...]  # host copy of each ``ints`` column's maximum (e.g. a top-k size)


@dataclass(frozen=True)
class StepMeta:
    """Everything the device part of a segment step needs (views into one transferred buffer)."""

    windows: Windows
    pad_pos: torch.Tensor | None  # (NL,) position of each logit slot in the (n*NS*seg) layout; None: identity
    cand: torch.Tensor
    flags: torch.Tensor
    ints: torch.Tensor
    floats: torch.Tensor
    int_max: tuple[int, ...]
    uniform: bool  # the program wants per-cell uniforms this step
    temperature: torch.Tensor | None  # (NL,) float64; None: every slot greedy
    seeds: torch.Tensor | None  # (NL,) the row seed of each logit slot (noise keys are hashed on device)
    steps: torch.Tensor | None  # (NL,) the row's step
    layout: tuple[int, int, int]  # n, NS, seg


@dataclass(frozen=True)
class HostLayout:
    """The host's copy of the cell layout, to map decisions back to (row, slot)."""

    seg_start: np.ndarray  # (n, NS) first slot of each segment, -1 for padding
    n: int
    ns: int
    seg: int


class Packer:
    """Builds the device tensors of a step on one device, reusing a pinned staging buffer on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._staging: torch.Tensor | None = None

    def windows(self, tokens: np.ndarray, plans: list[RowPlan], head_rows: np.ndarray, head_slots: np.ndarray,
                extra: dict[str, np.ndarray] | None = None) -> tuple[Windows, dict[str, torch.Tensor]]:
        """Windows of cache rows ``0..len(plans)-1`` with logits at ``(head_rows, head_slots)``.

        ``extra`` arrays (int64, or float64 viewed as int64) travel in the same transfer and come
        back as device views under their names.
        """
        n = len(plans)
        lens = np.array([max(p.end - p.start, 0) for p in plans], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lens)])
        n_tok = int(offsets[-1])
        width = max(int(lens.max()), 1)
        rows = np.repeat(np.arange(n, dtype=np.int64), lens)
        within = np.arange(n_tok, dtype=np.int64) - offsets[rows]
        starts = np.array([p.start for p in plans], dtype=np.int64)
        slots = starts[rows] + within
        t_idx = np.arange(width, dtype=np.int64)
        q_index = np.minimum(offsets[:-1, None] + np.minimum(t_idx[None], np.maximum(lens[:, None] - 1, 0)),
                             max(n_tok - 1, 0))
        key_len = np.array([max(p.keys, 1) for p in plans], dtype=np.int64)
        span = int(key_len.max())
        head_index = offsets[head_rows] + (head_slots - starts[head_rows])
        parts = {"ids": tokens[rows, slots], "rows": rows, "slots": slots, "q_index": q_index.reshape(-1),
                 "q_flat": rows * width + within, "key_len": key_len, "head_rows": head_rows,
                 "head_slots": head_slots, "head_index": head_index, **(extra or {})}
        dev = self._upload(parts)
        key_mask = None
        if (key_len < span).any():
            key_mask = (torch.arange(span, device=self.device)[None] < dev["key_len"][:, None])[:, None, None, :]
        w = Windows(ids=dev["ids"], rows=dev["rows"], slots=dev["slots"], q_index=dev["q_index"].view(n, width),
                    q_flat=dev["q_flat"], key_mask=key_mask, head_rows=dev["head_rows"], head_slots=dev["head_slots"],
                    head_index=dev["head_index"], n=n, T=width, S=span)
        return w, {name: dev[name] for name in (extra or {})}

    def pack(self, tokens: np.ndarray, plans: list[RowPlan], seg: int, mask_id: int, seeds: list[int],
             steps: list[int], uniform: bool) -> tuple[StepMeta, HostLayout]:
        """A segment step: ``plans[r]`` is cache row ``r``; a cell is a candidate while its slot holds ``mask_id``."""
        n = len(plans)
        ns = max(max((len(p.segments) for p in plans), default=0), 1)
        seg_start = np.full((n, ns), -1, dtype=np.int64)
        flags = np.zeros((n, ns), dtype=np.int64)
        for r, p in enumerate(plans):
            seg_start[r, : len(p.segments)] = p.segments
            flags[r, : len(p.flags)] = p.flags
        seg_rows, seg_k = np.nonzero(seg_start >= 0)
        cell_rows = np.repeat(seg_rows, seg)
        cell_slots = (seg_start[seg_rows, seg_k][:, None] + np.arange(seg)[None]).reshape(-1)
        pad_pos = ((seg_rows * ns + seg_k)[:, None] * seg + np.arange(seg)[None]).reshape(-1)
        cand = np.zeros(n * ns * seg, dtype=np.int64)
        cand[pad_pos] = tokens[cell_rows, cell_slots] == mask_id
        n_int = max((len(p.ints) for p in plans), default=0)
        n_float = max((len(p.floats) for p in plans), default=0)
        ints = np.array([list(p.ints) + [0] * (n_int - len(p.ints)) for p in plans], dtype=np.int64).reshape(n, n_int)
        floats = np.array([list(p.floats) + [0.0] * (n_float - len(p.floats)) for p in plans],
                          dtype=np.float64).reshape(n, n_float)
        temps = np.array([p.temperature for p in plans], dtype=np.float64)
        sampling = bool((temps > 0).any())
        extra = {"pad_pos": pad_pos, "cand": cand, "flags": flags.reshape(-1), "ints": ints.reshape(-1),
                 "floats": floats.reshape(-1).view(np.int64)}
        if sampling or uniform:
            extra["seeds"] = np.asarray(seeds, dtype=np.int64)[cell_rows]
            extra["steps"] = np.asarray(steps, dtype=np.int64)[cell_rows]
        if sampling:
            extra["temperature"] = temps[cell_rows].view(np.int64)
        windows, dev = self.windows(tokens, plans, cell_rows, cell_slots, extra)
        meta = StepMeta(
            windows=windows, pad_pos=None if len(pad_pos) == n * ns * seg else dev["pad_pos"],
            cand=dev["cand"].view(n, ns, seg).bool(), flags=dev["flags"].view(n, ns), ints=dev["ints"].view(n, n_int),
            floats=dev["floats"].view(torch.float64).view(n, n_float),
            int_max=tuple(int(v) for v in ints.max(axis=0)) if n_int else (), uniform=uniform,
            temperature=dev["temperature"].view(torch.float64) if sampling else None,
            seeds=dev.get("seeds"), steps=dev.get("steps"), layout=(n, ns, seg))
        return meta, HostLayout(seg_start, n, ns, seg)

    def _upload(self, parts: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        flat = np.concatenate([np.asarray(a, dtype=np.int64).reshape(-1) for a in parts.values()])
        host = torch.from_numpy(flat)
        if self.device.type == "cuda":
            if self._staging is None or self._staging.numel() < flat.size:
                self._staging = torch.empty(max(flat.size, 1 << 16), dtype=torch.long, pin_memory=True)
            staged = self._staging[: flat.size]
            staged.copy_(host)
            host = staged.to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            host = host.to(self.device)
        out, at = {}, 0
        for name, a in parts.items():
            size = np.asarray(a).size
            out[name] = host[at: at + size]
            at += size
        return out
