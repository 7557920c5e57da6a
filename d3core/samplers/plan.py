"""The types of one decode step: what a row asks of it, its packed shape, and what the device part sees.

A sampler's host side returns a :class:`RowPlan` per row; :mod:`d3core.samplers.packing` packs the
plans into one :class:`HostStep` (the transfer's int64 parts, the :class:`Shape` that keys its CUDA
graph, the :class:`HostLayout` that maps decisions back) and slices the uploaded buffer into the
:class:`StepMeta` views the device part reads; the commit rule receives :class:`Cells`, with the
per-row parameters by name in :class:`RowParams`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from d3core.cache import Windows


@dataclass
class RowPlan:
    """What one row asks of a step: recompute ``[start, end)``, attend to ``[0, keys)``, logits per segment.

    ``params`` are the commit rule's per-row parameters by name: ``bool`` and ``int`` values travel as
    int64, ``float`` values as float64, and the rule reads them as named ``(rows,)`` device tensors
    (:class:`RowParams`). Every row of a program gives the same names."""

    start: int
    end: int
    keys: int
    segments: list[int] = field(default_factory=list)  # first slot of each logit segment
    flags: list[int] = field(default_factory=list)  # one sampler-defined flag per segment
    params: dict[str, bool | int | float] = field(default_factory=dict)
    temperature: float = 0.0

    @property
    def sits_out(self) -> bool:
        return self.end <= self.start


SIT_OUT = RowPlan(0, 0, 1)  # a row that sits a step out (also the padding rows of a bucketed step)


@dataclass(frozen=True)
class RowParams:
    """The commit rule's per-row parameters of a step, by name: ``row["threshold"]`` is a ``(rows,)`` device
    tensor (int64 for bool and int parameters, float64 for float ones); ``max``, ``min``, ``any`` and
    ``all`` of an int or bool parameter over the step's rows are host values (no device read), for shapes
    (a top-k size) and for code paths (whether some row uses a rule)."""

    ints: torch.Tensor  # (n, len(int_names)) int64
    floats: torch.Tensor  # (n, len(float_names)) float64
    int_names: tuple[str, ...]
    float_names: tuple[str, ...]
    host_min: tuple[int, ...]  # per int parameter, over the real rows
    host_max: tuple[int, ...]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.int_names:
            return self.ints[:, self.int_names.index(name)]
        if name in self.float_names:
            return self.floats[:, self.float_names.index(name)]
        raise KeyError(f"no per-row parameter {name!r}: this step has {self.int_names + self.float_names}")

    def max(self, name: str) -> int:
        return self.host_max[self._int(name)]

    def min(self, name: str) -> int:
        return self.host_min[self._int(name)]

    def any(self, name: str) -> bool:
        return self.max(name) > 0

    def all(self, name: str) -> bool:
        return self.min(name) > 0

    def _int(self, name: str) -> int:
        if name not in self.int_names:
            raise KeyError(f"{name!r} is not an int or bool per-row parameter (those are {self.int_names}): host "
                           "summaries exist for them only")
        return self.int_names.index(name)


@dataclass(frozen=True)
class Cells:
    """The device view of one step's logit cells, ``(n, NS, seg)``, handed to a commit rule."""

    tokens: torch.Tensor
    conf: torch.Tensor
    logprob: torch.Tensor
    entropy: torch.Tensor | None
    cand: torch.Tensor  # bool: a masked slot the rule may commit
    flags: torch.Tensor  # (n, NS) long
    row: RowParams  # the commit rule's per-row parameters, by name
    uniform: torch.Tensor | None  # (n, NS, seg) float64 per-cell uniforms, when the program asks


@dataclass(frozen=True)
class Shape:
    """The sizes and code paths of a segment step's device part (the key of its CUDA graph)."""

    n: int  # cache rows [0, n) in the step
    tokens: int  # window tokens N
    T: int  # padded query width
    S: int  # key span
    ns: int  # segments per row
    seg: int  # cells per segment
    int_names: tuple[str, ...]  # the rule's int and bool per-row parameters
    float_names: tuple[str, ...]  # its float ones
    host_min: tuple[int, ...]  # each int parameter's minimum and maximum over the real rows (see RowParams)
    host_max: tuple[int, ...]
    sampling: bool  # some row samples (temperature > 0)
    uniform: bool  # the program wants per-cell uniforms
    masked_keys: bool  # some row attends to fewer than S slots
    padded_cells: bool  # logit slots are scattered into the (n, NS, seg) layout
    aligned: bool = False  # every window has T slots (see Windows.aligned)
    dense: bool = False  # every row recomputes all of its S slots (see Windows.dense)
    store: bool = True  # the window's K/V are written into the cache


@dataclass(frozen=True)
class StepMeta:
    """Everything the device part of a segment step needs (views into one transferred buffer)."""

    windows: Windows
    pad_pos: torch.Tensor | None  # (NL,) position of each logit slot in the (n*NS*seg) layout; None: identity
    cand: torch.Tensor
    flags: torch.Tensor
    row: RowParams
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
    cell_rows: np.ndarray  # (NL,) row of each logit slot, in transfer order
    cell_slots: np.ndarray  # (NL,) its slot
    pad_pos: np.ndarray | None  # (NL,) its place in the (n * NS * seg) layout; None: the identity


@dataclass(frozen=True)
class Refill:
    """How a later step with the same geometry (:func:`step_key`) rebuilds the parts that change every
    step (window tokens, candidates, rule parameters, step counters), in place."""

    key: tuple
    id_rows: np.ndarray | None  # ids[:len(id_rows)] = tokens[id_rows, id_slots]; None: dense, tokens[:n, :T]
    id_slots: np.ndarray | None
    cand_rows: np.ndarray  # cand[cand_at] = tokens[cand_rows, cand_slots] == mask_id
    cand_slots: np.ndarray
    cand_at: np.ndarray | None  # None: every cand entry, in order
    cell_rows: np.ndarray  # the row of each logit slot (for the per-slot step counters)


# The parts a refill rewrites; every other part depends on the step key alone.
DYNAMIC_PARTS = ("ids", "cand", "ints", "floats", "steps")


@dataclass(frozen=True)
class StepSpec:
    """Host-only description of a step's transfer buffer: its parts' names and sizes, and the step's shape.

    A captured step is a function of ``(buffer, spec)`` alone: every device tensor it reads is a view
    of the buffer (:meth:`split`) or derived from one inside the captured region, so a replay that
    refreshes the buffer refreshes every input (:mod:`d3core.samplers.graphs`)."""

    parts: tuple[tuple[str, int], ...]
    shape: Shape

    @property
    def size(self) -> int:
        return sum(n for _, n in self.parts)

    def split(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parts as views of ``buffer``, in transfer order."""
        return split_buffer(buffer, self.parts)


def part_sizes(parts: dict[str, np.ndarray]) -> tuple[tuple[str, int], ...]:
    return tuple((name, int(np.asarray(a).size)) for name, a in parts.items())


def split_buffer(buffer: torch.Tensor, sizes: tuple[tuple[str, int], ...]) -> dict[str, torch.Tensor]:
    """Consecutive views of ``buffer``, one per ``(name, size)``."""
    out, at = {}, 0
    for name, n in sizes:
        out[name] = buffer[at: at + n]
        at += n
    return out


@dataclass(frozen=True)
class HostStep:
    parts: dict[str, np.ndarray]  # int64 arrays in transfer order
    shape: Shape
    layout: HostLayout
    refill: Refill | None = None

    @property
    def spec(self) -> StepSpec:
        return StepSpec(part_sizes(self.parts), self.shape)
