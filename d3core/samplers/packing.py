"""Host-side step plans packed into the device tensors of one decode step.

Every step the engine turns the rows' :class:`RowPlan` s into one flat int64 array (window
tokens, slots, attention and head indices, the logit-cell layout, the commit rule's per-row
parameters), copies it to the device in one transfer (pinned and non-blocking on CUDA) and
slices it into views. Nothing here reads device memory.

The logit cells of a step are laid out ``(n, NS, seg)``: row, segment (a block of ``seg``
consecutive slots whose logits are wanted), cell. Rows with fewer segments are padded; padded
cells are never candidates. A plan with an empty window (``start == end``) sits the step out.

With ``buckets`` every size is rounded up (rows, tokens, query width, key span, segments), so
a step's :class:`Shape` — everything the device part's shapes and code paths depend on —
takes few distinct values and each can be captured once as a CUDA graph. Padding tokens write
to the cache's scratch row; padding rows attend to one slot and commit nothing.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from d3core.cache import Windows
from d3core.samplers.plan import (
    SIT_OUT,
    HostLayout,
    HostStep,
    Refill,
    RowParams,
    RowPlan,
    Shape,
    StepMeta,
    part_sizes,
    split_buffer,
)
from d3core.samplers.transfer import HostLink


def bucket(x: int, cap: int | None = None) -> int:
    """Round ``x`` up to a coarse size (<= 25% padding, O(log x) distinct values), at most ``cap``."""
    x = max(int(x), 1)
    quantum = max(8, (1 << (x.bit_length() - 1)) // 4)
    out = -(-x // quantum) * quantum
    return min(out, cap) if cap is not None else out


def _windows_parts(tokens: np.ndarray, plans: list[RowPlan], head_rows: np.ndarray, head_slots: np.ndarray,
                   capacity: int, pad_to: tuple[int, int, int] | None, scratch: tuple[int, int] = (0, 0)):
    """Window index arrays; ``pad_to`` = (tokens, T, S) bucket sizes; ``scratch`` = (row, token id) for padding.

    Returns ``(parts, N, T, S, masked, aligned, dense)`` (see :class:`~d3core.cache.Windows`).
    """
    n = len(plans)
    width = max(max(p.end - p.start for p in plans), 1)
    if pad_to is None and all(p.end - p.start == width for p in plans):
        return _aligned_parts(tokens, plans, width, head_rows, head_slots, capacity)
    if pad_to is None and _whole_rows(plans, width):
        return _aligned_parts(tokens, plans, width, head_rows, head_slots, capacity, dense=True)
    lens = np.array([max(p.end - p.start, 0) for p in plans], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    n_tok = int(offsets[-1])
    rows = np.repeat(np.arange(n, dtype=np.int64), lens)
    within = np.arange(n_tok, dtype=np.int64) - offsets[rows]
    starts = np.array([p.start for p in plans], dtype=np.int64)
    slots = starts[rows] + within
    ids = tokens[rows, slots]
    key_len = np.array([max(p.keys, 1) for p in plans], dtype=np.int64)
    span = int(key_len.max())
    q_flat = rows * width
    if pad_to is not None:
        size, width, span = pad_to
        extra = size - n_tok
        rows = np.concatenate([rows, np.full(extra, scratch[0], dtype=np.int64)])
        slots = np.concatenate([slots, np.zeros(extra, dtype=np.int64)])
        ids = np.concatenate([ids, np.full(extra, scratch[1], dtype=np.int64)])
        within = np.concatenate([within, np.zeros(extra, dtype=np.int64)])
        q_flat = np.concatenate([rows[:n_tok] * width, np.zeros(extra, dtype=np.int64)])
    t_idx = np.arange(width, dtype=np.int64)
    q_index = np.minimum(offsets[:-1, None] + np.minimum(t_idx[None], np.maximum(lens[:, None] - 1, 0)),
                         max(n_tok - 1, 0))
    head_index = offsets[head_rows] + np.maximum(head_slots - starts[head_rows], 0)
    parts = {"ids": ids, "rows": rows, "slots": slots, "q_index": q_index.reshape(-1), "q_flat": q_flat + within,
             "key_len": key_len, "head_rows": head_rows, "head_slots": head_slots, "head_index": head_index,
             "cache_index": rows * capacity + slots, "head_prev": head_rows * capacity + np.maximum(head_slots - 1, 0)}
    return parts, len(ids), width, span, bool((key_len < span).any()) or pad_to is not None, False, False


# A step of whole-row recomputes is padded to its longest row (see _whole_rows) while that adds at
# most this fraction of its real tokens.
WHOLE_ROW_PADDING = 0.25


def _whole_rows(plans: list[RowPlan], width: int) -> bool:
    """Whether every row recomputes its whole sequence ``[0, keys)`` and padding them all to ``width``
    slots costs at most :data:`WHOLE_ROW_PADDING` more tokens.

    Such a step runs dense (:attr:`~d3core.cache.Windows.dense`): each row's window is ``[0, width)``,
    the slots past its own length hold padding whose keys are masked and whose outputs nobody reads,
    and the forward needs no query gather, output gather or (with ``store=False``) cache write."""
    real = sum(p.end for p in plans)
    return (all(p.start == 0 and p.end == p.keys for p in plans)
            and len(plans) * width <= (1 + WHOLE_ROW_PADDING) * real)


def _aligned_parts(tokens: np.ndarray, plans: list[RowPlan], width: int, head_rows: np.ndarray,
                   head_slots: np.ndarray, capacity: int, dense: bool | None = None):
    """:func:`_windows_parts` when every window has ``width`` slots: the same arrays from fewer host
    operations, the query layout being the identity. ``dense=True``: every window is ``[0, width)``
    (whole rows padded to the longest, see :func:`_whole_rows`); default: whether the plans' are."""
    n = len(plans)
    flat = np.arange(n * width, dtype=np.int64)
    rows, within = np.divmod(flat, width)
    if dense is None:
        dense = all(p.start == 0 and p.keys == width for p in plans)
    if dense:
        starts, slots, ids = np.zeros(n, dtype=np.int64), within, tokens[:n, :width].reshape(-1).copy()
    else:
        starts = np.array([p.start for p in plans], dtype=np.int64)
        slots = starts[rows] + within
        ids = tokens[rows, slots]
    keys = [max(p.keys, 1) for p in plans]
    span = max(keys)
    parts = {"ids": ids, "rows": rows, "slots": slots, "q_index": flat, "q_flat": flat,
             "key_len": np.array(keys, dtype=np.int64), "head_rows": head_rows, "head_slots": head_slots,
             "head_index": head_rows * width + np.maximum(head_slots - starts[head_rows], 0),
             "cache_index": rows * capacity + slots, "head_prev": head_rows * capacity + np.maximum(head_slots - 1, 0)}
    return parts, n * width, width, span, min(keys) < span, True, dense


def _cell_layout(plans: list[RowPlan], ns: int, seg: int, bucketed: bool):
    """Where each logit cell reads: ``(seg_start, flags, cell_rows, cell_slots, pad_pos, real)``.

    Cells are listed segment by segment; ``pad_pos`` (None: the identity) places them in the
    ``(n, NS, seg)`` layout, ``real`` (None: all) marks those of a real segment.
    """
    n = len(plans)
    if all(len(p.segments) == ns and len(p.flags) in (0, ns) for p in plans):  # no padded segment
        seg_start = np.array([p.segments for p in plans], dtype=np.int64).reshape(n, ns)
        flags = np.array([p.flags or [0] * ns for p in plans], dtype=np.int64).reshape(n, ns)
        cell_rows = np.repeat(np.arange(n, dtype=np.int64), ns * seg)
        cell_slots = (seg_start[:, :, None] + np.arange(seg, dtype=np.int64)).reshape(-1)
        return seg_start, flags, cell_rows, cell_slots, None, None
    seg_start = np.full((n, ns), -1, dtype=np.int64)
    flags = np.zeros((n, ns), dtype=np.int64)
    for r, p in enumerate(plans):
        seg_start[r, : len(p.segments)] = p.segments
        flags[r, : len(p.flags)] = p.flags
    if not bucketed:
        seg_rows, seg_k = np.nonzero(seg_start >= 0)
    else:  # every cell of the padded layout is a logit slot (padding reads row 0, slot 0)
        seg_rows, seg_k = np.divmod(np.arange(n * ns, dtype=np.int64), ns)
    first = seg_start[seg_rows, seg_k]
    live = first >= 0
    real = np.repeat(live, seg)
    cell_rows = np.where(live, seg_rows, 0).repeat(seg)
    cell_slots = np.where(real, (np.maximum(first, 0)[:, None] + np.arange(seg)[None]).reshape(-1), 0)
    pad_pos = ((seg_rows * ns + seg_k)[:, None] * seg + np.arange(seg)[None]).reshape(-1)
    if len(pad_pos) == n * ns * seg:  # bucketed: every cell is in place
        pad_pos = None
    return seg_start, flags, cell_rows, cell_slots, pad_pos, None if real.all() else real


def param_names(plans: list[RowPlan]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The int (and bool) and the float per-row parameter names of a step's rows (padding rows have none)."""
    named = next((p.params for p in plans if p.params), {})
    ints = tuple(k for k, v in named.items() if not isinstance(v, float))
    return ints, tuple(k for k in named if k not in ints)


def _rule_params(plans: list[RowPlan], names: tuple[tuple[str, ...], tuple[str, ...]]):
    """Per-row int and float parameter arrays (rows without parameters, padding, hold zeros) and the int
    parameters' minimum and maximum over the rows that have them."""
    int_names, float_names = names
    real = [p for p in plans if p.params]
    for p in real:
        if set(p.params) != set(int_names + float_names):
            raise ValueError(f"a row's per-row parameters {sorted(p.params)} differ from the step's "
                             f"{sorted(int_names + float_names)}: every row of a program names the same ones")
    ints = np.array([[int(p.params[k]) for k in int_names] if p.params else [0] * len(int_names) for p in plans],
                    dtype=np.int64).reshape(len(plans), len(int_names))
    floats = np.array([[float(p.params[k]) for k in float_names] if p.params else [0.0] * len(float_names)
                       for p in plans], dtype=np.float64).reshape(len(plans), len(float_names))
    rows = ints[[i for i, p in enumerate(plans) if p.params]] if real else ints[:0]
    lo = tuple(int(v) for v in rows.min(0)) if len(rows) else (0,) * len(int_names)
    hi = tuple(int(v) for v in rows.max(0)) if len(rows) else (0,) * len(int_names)
    return ints, floats, lo, hi


def step_key(plans: list[RowPlan], seg: int, mask_id: int, seeds: list[int], uniform: bool, capacity: int,
             buckets: dict | None, store: bool) -> tuple:
    """Everything a segment step's parts depend on except the tokens, rule parameters and step counters."""
    return (seg, mask_id, uniform, capacity, store, None if buckets is None else tuple(buckets.values()),
            tuple(seeds), param_names(plans), tuple((p.start, p.end, p.keys, tuple(p.segments), tuple(p.flags),
                                                     p.temperature) for p in plans))


def build_segment_step(tokens: np.ndarray, plans: list[RowPlan], seg: int, mask_id: int, seeds: list[int],
                       steps: list[int], uniform: bool, capacity: int, buckets: dict | None = None,
                       store: bool = True, previous: HostStep | None = None) -> HostStep:
    """A segment step's host arrays; ``plans[r]`` is cache row ``r``; a cell is a candidate while it holds ``mask_id``.

    ``buckets`` (``rows``, ``capacity``, ``scratch_row``, ``pad_id``, ``max_segments``) rounds every size up;
    ``store=False`` skips the cache write (no later step reads these slots' K/V). When ``previous`` has this
    step's :func:`step_key` (rows in a block keep their windows for many steps), its arrays are reused: only
    the :data:`DYNAMIC_PARTS` are rewritten, in place, and the returned step holds the same ``parts`` dict.
    """
    key = step_key(plans, seg, mask_id, seeds, uniform, capacity, buckets, store)
    if previous is not None and previous.refill is not None and previous.refill.key == key:
        return _refilled(previous, tokens, plans, steps, mask_id)
    n_real = len(plans)
    if buckets is not None:
        n = min(bucket(n_real), buckets["rows"])
        plans = plans + [SIT_OUT] * (n - n_real)
        seeds, steps = list(seeds) + [0] * (n - n_real), list(steps) + [0] * (n - n_real)
    n = len(plans)
    ns = max(max(len(p.segments) for p in plans), 1)
    if buckets is not None:
        ns = min(1 << (ns - 1).bit_length(), max(buckets["max_segments"], ns))
    seg_start, flags, cell_rows, cell_slots, pad_pos, real = _cell_layout(plans, ns, seg, buckets is not None)
    cand_rows, cand_slots, cand_at = cell_rows, cell_slots, pad_pos
    if pad_pos is not None:  # some row has fewer segments: its missing ones are never candidates
        cand = np.zeros(n * ns * seg, dtype=np.int64)
    elif real is not None:  # bucketed padding
        cand = np.zeros(len(cell_rows), dtype=np.int64)
        cand_at = np.flatnonzero(real)
        cand_rows, cand_slots = cell_rows[cand_at], cell_slots[cand_at]
    else:
        cand = np.zeros(len(cell_rows), dtype=np.int64)
    _fill_cand(cand, tokens, cand_rows, cand_slots, cand_at, mask_id)
    names = param_names(plans)
    ints, floats, lo, hi = _rule_params(plans, names)
    sampling = any(p.temperature > 0 for p in plans)
    pad_to = None
    if buckets is not None:
        n_tok = sum(max(p.end - p.start, 0) for p in plans)
        width = max((max(p.end - p.start, 0) for p in plans), default=1)
        span = max(max(p.keys, 1) for p in plans)
        pad_to = (bucket(n_tok), min(bucket(width), buckets["capacity"]), min(bucket(span), buckets["capacity"]))
    scratch = (buckets["scratch_row"], buckets["pad_id"]) if buckets is not None else (0, 0)
    parts, n_tok, width, span, masked, aligned, dense = _windows_parts(tokens, plans, cell_rows, cell_slots,
                                                                       capacity, pad_to, scratch)
    if pad_pos is not None:
        parts["pad_pos"] = pad_pos
    parts.update({"cand": cand, "flags": flags.reshape(-1), "ints": ints.reshape(-1),
                  "floats": floats.reshape(-1).view(np.int64)})
    if sampling or uniform:
        parts["seeds"] = np.asarray(seeds, dtype=np.int64)[cell_rows]
        parts["steps"] = np.asarray(steps, dtype=np.int64)[cell_rows]
    if sampling:
        temps = np.array([p.temperature for p in plans], dtype=np.float64)[cell_rows]
        parts["temperature"] = (temps if real is None else np.where(real, temps, 0.0)).view(np.int64)
    # A gathered (non-dense) attention reads the window's keys back from the cache: it must store them.
    shape = Shape(n, n_tok, width, span, ns, seg, names[0], names[1], lo, hi, sampling, uniform, masked,
                  pad_pos is not None, aligned, dense, store or not dense)
    if dense:
        id_rows = id_slots = None
    else:
        real_tokens = n_tok if aligned else sum(max(p.end - p.start, 0) for p in plans)
        id_rows, id_slots = parts["rows"][:real_tokens], parts["slots"][:real_tokens]
    refill = Refill(key, id_rows, id_slots, cand_rows, cand_slots, cand_at, cell_rows)
    return HostStep(parts, shape, HostLayout(seg_start, n, ns, seg, cell_rows, cell_slots, pad_pos), refill)


def _fill_cand(cand: np.ndarray, tokens: np.ndarray, rows: np.ndarray, slots: np.ndarray, at: np.ndarray | None,
               mask_id: int) -> None:
    hit = tokens[rows, slots] == mask_id
    if at is None:
        cand[:] = hit
    else:
        cand[at] = hit


def _refilled(previous: HostStep, tokens: np.ndarray, plans: list[RowPlan], steps: list[int],
              mask_id: int) -> HostStep:
    """``previous`` with its dynamic parts rewritten in place for this step (same geometry, see :func:`step_key`)."""
    parts, fill, shape = previous.parts, previous.refill, previous.shape
    n = shape.n
    plans = plans + [SIT_OUT] * (n - len(plans))  # bucketed padding rows, as in build_segment_step
    ids = parts["ids"]
    if fill.id_rows is None:
        ids.reshape(n, shape.T)[:] = tokens[:n, : shape.T]
    else:
        ids[: len(fill.id_rows)] = tokens[fill.id_rows, fill.id_slots]
    _fill_cand(parts["cand"], tokens, fill.cand_rows, fill.cand_slots, fill.cand_at, mask_id)
    ints, floats, lo, hi = _rule_params(plans, (shape.int_names, shape.float_names))
    parts["ints"][:] = ints.reshape(-1)
    parts["floats"][:] = floats.reshape(-1).view(np.int64)
    if "steps" in parts:
        parts["steps"][:] = np.asarray(list(steps) + [0] * (n - len(steps)), dtype=np.int64)[fill.cell_rows]
    if (lo, hi) != (shape.host_min, shape.host_max):
        shape = replace(shape, host_min=lo, host_max=hi)
    return HostStep(parts, shape, previous.layout, fill)


class Packer:
    """Uploads host arrays in one transfer (through its :class:`~d3core.samplers.transfer.HostLink`) and
    slices them into views."""

    def __init__(self, device: torch.device, capacity: int, link: HostLink | None = None) -> None:
        self.device, self.capacity = device, capacity
        self.link = link or HostLink(device)

    def upload(self, parts: dict[str, np.ndarray], into: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One host-to-device copy of every part; ``into`` is a preallocated device buffer to fill (graphs).

        On the CPU the parts are wrapped as they are (no copy)."""
        if self.device.type == "cpu" and into is None:
            return {name: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64).reshape(-1))
                    for name, a in parts.items()}
        flat = np.concatenate([np.asarray(a, dtype=np.int64).reshape(-1) for a in parts.values()])
        return split_buffer(self.link.to_device(flat, into), part_sizes(parts))

    def windows(self, tokens: np.ndarray, plans: list[RowPlan], head_rows: np.ndarray, head_slots: np.ndarray,
                extra: dict[str, np.ndarray] | None = None) -> tuple[Windows, dict[str, torch.Tensor]]:
        """Windows of cache rows ``0..len(plans)-1`` with logits at ``(head_rows, head_slots)``, uploaded now.

        ``extra`` arrays (int64, or float64 viewed as int64) travel in the same transfer and come
        back as device views under their names.
        """
        parts, n_tok, width, span, masked, aligned, dense = _windows_parts(tokens, plans, head_rows, head_slots,
                                                                           self.capacity, None)
        dev = self.upload({**parts, **(extra or {})})
        return windows_view(dev, len(plans), width, span, masked, self.device, aligned, dense), \
            {name: dev[name] for name in (extra or {})}


def windows_view(dev: dict[str, torch.Tensor], n: int, width: int, span: int, masked: bool,
                 device: torch.device, aligned: bool = False, dense: bool = False, store: bool = True) -> Windows:
    key_mask = None
    if masked:
        key_mask = (torch.arange(span, device=device)[None] < dev["key_len"][:, None])[:, None, None, :]
    return Windows(ids=dev["ids"], rows=dev["rows"], slots=dev["slots"], q_index=dev["q_index"].view(n, width),
                   q_flat=dev["q_flat"], key_mask=key_mask, head_rows=dev["head_rows"], head_slots=dev["head_slots"],
                   head_index=dev["head_index"], cache_index=dev["cache_index"], head_prev=dev["head_prev"], n=n,
                   T=width, S=span, aligned=aligned, dense=dense, store=store)


def segment_meta(dev: dict[str, torch.Tensor], shape: Shape, device: torch.device) -> StepMeta:
    """The device views of an uploaded segment step (see :func:`build_segment_step`)."""
    n, ns, seg = shape.n, shape.ns, shape.seg
    return StepMeta(
        windows=windows_view(dev, n, shape.T, shape.S, shape.masked_keys, device, shape.aligned, shape.dense,
                             shape.store),
        pad_pos=dev["pad_pos"] if shape.padded_cells else None, cand=dev["cand"].view(n, ns, seg).bool(),
        flags=dev["flags"].view(n, ns),
        row=RowParams(dev["ints"].view(n, len(shape.int_names)),
                      dev["floats"].view(torch.float64).view(n, len(shape.float_names)), shape.int_names,
                      shape.float_names, shape.host_min, shape.host_max),
        uniform=shape.uniform, temperature=dev["temperature"].view(torch.float64) if shape.sampling else None,
        seeds=dev.get("seeds"), steps=dev.get("steps"), layout=(n, ns, seg))
