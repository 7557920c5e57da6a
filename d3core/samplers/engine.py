"""The decode engine under every dLLM sampler: host-side row state, one batched device step.

A :class:`Decoder` holds up to ``rows`` sequences in a :class:`~d3core.cache.KVCache` and a host
copy of their slots (tokens, the step at which each was committed, its log-probability). Each
:meth:`Decoder.step`:

1. asks the sampler's :class:`Program` for every row's :class:`~d3core.samplers.packing.RowPlan`
   (which slots to recompute, which to attend to, which blocks need logits; ``None`` when the
   row is finished), using only host state;
2. packs the plans into one host-to-device transfer and runs the device part: the packed-window
   forward, token statistics on the requested cells only, and the program's commit rule;
3. brings the decisions back in one device-to-host transfer (the step's only synchronisation)
   and applies them to the host state.

Rows are independent: a row's tokens depend only on its own prompt, parameters and seed,
never on which other rows share the step. They may join (:meth:`Decoder.add`) and leave
(finished or :meth:`Decoder.cancel`) between steps; a leaving row's cache slot is refilled by
moving the last row into it (one row copied, never the whole cache).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import torch

from d3core.cache import KVCache
from d3core.samplers import graphs as graph_modes
from d3core.samplers.base import SequenceResult, validate_prompts
from d3core.samplers.logits import cell_keys, token_stats, uniform_per_cell
from d3core.samplers.packing import Packer, build_segment_step, segment_meta
from d3core.samplers.plan import DYNAMIC_PARTS, Cells, HostLayout, HostStep, RowPlan, StepMeta, StepSpec

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Row:
    """One sequence in a decoder. ``state`` belongs to the sampler's program."""

    prompt: tuple[int, ...]
    params: Any
    seed: int
    tag: Any = None
    cache_row: int = -1
    nfe: int = 0
    computed: int = 0  # window tokens recomputed for this row over all its steps (padding excluded)
    emitted: int = 0  # answer tokens already reported in a RowOutput
    finish_reason: str | None = None  # reported once the answer is complete (see RowOutput)
    state: Any = None
    finished: bool = False
    result: SequenceResult | None = None
    error: str | None = None  # why the engine ended the row early, if it did

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    @property
    def length(self) -> int:
        return len(self.prompt) + self.params.gen_length


class Program:
    """A sampler's commit rule on the engine. Subclasses override the hooks they need."""

    name = ""
    needs_entropy = False
    reusable = True  # one instance serves any number of decodes (no per-call state): pooled decoders keep it
    joins_mid_run = True  # rows may join a running decoder between steps (a server may batch continuously)

    def segment_length(self, params) -> int:
        return params.block_length

    def reads_cache(self, params) -> bool:
        """Whether a row with these params ever attends to slots outside its window (cached K/V).

        A step in which no row does skips the cache write."""
        return True

    def wants_uniform(self, params) -> bool:
        """Whether this row's rule needs one uniform per logit cell (random remasking)."""
        return False

    def init_row(self, row: Row, d: "Decoder") -> None:
        """Set up ``row.state``; ``d.tokens[row.cache_row]`` holds the prompt, then masks."""

    def plan(self, row: Row, d: "Decoder") -> RowPlan | None:
        """The row's request for the next step, or None when it is finished."""
        raise NotImplementedError

    def plan_all(self, d: "Decoder") -> list[RowPlan | None]:
        """Every row's plan; a row whose planning raises ends with ``row.error`` and the others go on."""
        plans: list[RowPlan | None] = []
        for row in d.rows:
            try:
                plans.append(self.plan(row, d))
            except Exception as e:  # isolate the row: its state is suspect, the batch's is not
                logger.exception("%s: planning failed for a row", self.name)
                row.error = f"{self.name} could not plan this row ({type(e).__name__}: {e})"
                plans.append(None)
        return plans

    def rule(self, cells: Cells) -> torch.Tensor:
        """Device: bool ``(n, NS, seg)`` of the cells to commit this step."""
        raise NotImplementedError

    def run_step(self, d: "Decoder", rows: list[Row], plans: list[RowPlan], steps: list[int]) -> list[np.ndarray]:
        """Pack, run the device part, fetch and apply one step; returns each row's committed slots.

        The default is the segment step (:meth:`rule` on ``(n, NS, seg)`` cells); a program with
        another device part (APD's verifier) overrides this.
        """
        return d.segment_step(rows, plans, steps)

    def after(self, row: Row, d: "Decoder", committed: np.ndarray) -> None:
        """Host: update ``row.state`` after this step's commits (``committed`` holds their slots);
        set ``row.finished`` to end the row now."""


@dataclass
class _EagerStep:
    """The last eager step's host arrays and the device views made of them (CPU: the same memory)."""

    parts: dict[str, np.ndarray]
    cand: torch.Tensor  # int64 view of the uploaded candidate part
    meta: StepMeta


@dataclass(frozen=True)
class RowOutput:
    """What one row produced in a step: the answer tokens that became final (contiguous, from the front),
    and whether the answer is complete.

    ``finish_reason``: ``"stop"`` when an EOS closed the answer (final even while the sampler still fills
    slots after it: committed tokens never change), ``"length"`` when the row ended with every slot
    filled and no EOS, ``"error"`` when the engine ended it (``row.error`` says why); None while open."""

    row: Row
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str | None = None
    ended: bool = False  # the row left the decoder this step (its answer may have been complete earlier)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StepReport:
    finished: list[Row] = field(default_factory=list)
    forwarded: bool = False
    outputs: list[RowOutput] = field(default_factory=list)  # one per row with news this step


class Decoder:
    """Up to ``rows`` sequences of at most ``capacity`` slots each, decoded by one program.

    ``graphs`` replays segment steps as captured graphs, one per bucketed step shape: ``True`` or
    ``"cuda"`` (CUDA graphs), ``"emulate"`` (their semantics on any device, :mod:`~d3core.samplers.replay`),
    ``False`` or ``"off"``; ``None`` takes :func:`~d3core.samplers.graphs.default_mode` (CUDA graphs on
    CUDA devices). ``buckets`` (default: as ``graphs``) rounds step sizes up even when running eagerly.
    ``emit_outputs`` fills each :class:`StepReport`'s ``outputs`` (per-row :class:`RowOutput` s: what a
    server consumes, instead of reading the decoder's slots).
    """

    def __init__(self, model: torch.nn.Module, program: Program, rows: int, capacity: int,
                 verifier: torch.nn.Module | None = None, graphs: bool | str | None = None,
                 buckets: bool | None = None, emit_outputs: bool = False) -> None:
        cfg = model.config
        self.model, self.program, self.verifier = model, program, verifier
        self.device = next(model.parameters()).device
        self.cache = KVCache.for_model(model, rows, capacity)
        self.capacity, self.max_rows = capacity, rows
        self.mask_id, self.pad_id, self.eos_ids = cfg.mask_id, cfg.pad_id, tuple(cfg.eos_ids)
        self.tokens = np.full((rows, capacity), cfg.pad_id, dtype=np.int64)
        self.unmask = np.full((rows, capacity), -1, dtype=np.int64)
        self.logprob = np.zeros((rows, capacity), dtype=np.float32)
        self.rows: list[Row] = []  # active rows; rows[i].cache_row == i
        self.forwards = 0
        self.packer = Packer(self.device, capacity)
        self._seg: int | None = None
        self._last_step: HostStep | None = None  # reused while the geometry repeats (see build_segment_step)
        self._eager: _EagerStep | None = None
        self.graphs = None
        mode = graph_modes.resolve(graphs, self.device)
        if mode != "off":
            self.graphs = graph_modes.GraphRunner(self.packer, self._captured_step, mode)
        self.buckets = self.graphs is not None if buckets is None else buckets
        self.emit_outputs = emit_outputs

    # ------------------------------------------------------------------ membership
    @torch.inference_mode()
    def add(self, prompt: Sequence[int], params, seed: int = 0, tag: Any = None) -> Row:
        """Start decoding ``prompt``; raises ValueError (nothing changed) if it cannot be decoded here."""
        cfg = self.model.config
        validate_prompts([prompt], params.gen_length, cfg.max_seq_len, cfg.vocab_size)
        length = len(prompt) + params.gen_length
        if length > self.capacity:
            raise ValueError(f"prompt of {len(prompt)} tokens + gen_length {params.gen_length} = {length} slots "
                             f"exceeds this decoder's capacity {self.capacity}: build it with a larger capacity")
        if len(self.rows) >= self.max_rows:
            raise ValueError(f"decoder is full ({self.max_rows} rows): wait for a row to finish or build a larger one")
        seg = self.program.segment_length(params)
        if self._seg is not None and self.rows and seg != self._seg:
            raise ValueError(f"segment length {seg} differs from the running rows' {self._seg}: rows of one decoder "
                             "share block_length")
        self._seg = seg
        row = Row(tuple(int(t) for t in prompt), params, int(seed), tag, cache_row=len(self.rows))
        r = row.cache_row
        self.tokens[r] = self.pad_id
        self.tokens[r, : len(prompt)] = row.prompt
        self.tokens[r, len(prompt): length] = self.mask_id
        self.unmask[r] = -1
        self.logprob[r] = 0.0
        self.program.init_row(row, self)
        self.rows.append(row)
        return row

    @torch.inference_mode()
    def cancel(self, row: Row) -> None:
        """Remove a row now (its partial result is kept in ``row.result``)."""
        if row in self.rows:
            self._leave(row)

    def _leave(self, row: Row) -> None:
        r, last = row.cache_row, self.rows[-1]
        row.result = self._result(row)
        row.finished = True
        if last is not row:
            self.cache.move_row(last.cache_row, r)
            for buf in (self.tokens, self.unmask, self.logprob):
                buf[r] = buf[last.cache_row]
            last.cache_row = r
            self.rows[r] = last
        self.rows.pop()
        row.cache_row = -1

    def gen(self, row: Row) -> tuple[np.ndarray, np.ndarray]:
        """Views of the row's generation slots: tokens and unmask steps (host state, writable)."""
        r = row.cache_row
        return self.tokens[r, row.prompt_len: row.length], self.unmask[r, row.prompt_len: row.length]

    def first_eos(self, row: Row) -> int | None:
        """Index (in the generation slots) of the row's first committed EOS, or None."""
        gen, _ = self.gen(row)
        hits = np.flatnonzero(is_eos(gen, self.eos_ids))
        return int(hits[0]) if len(hits) else None

    def fill_eos(self, row: Row, start: int, step: int, overwrite: bool) -> None:
        """Slots ``[start, gen_length)`` become EOS; the undecided ones among them record ``step``.

        ``overwrite`` also replaces tokens committed there (d3LLM's early stop); otherwise only
        undecided slots change. The one place every sampler ends an answer at EOS.
        """
        gen, unmask = self.gen(row)
        tail, steps = gen[start:], unmask[start:]
        undecided = tail == self.mask_id
        steps[undecided & (steps < 0)] = step
        if overwrite:
            tail[:] = self.eos_ids[0]
        else:
            tail[undecided] = self.eos_ids[0]

    def _result(self, row: Row) -> SequenceResult:
        r, p, end = row.cache_row, row.prompt_len, row.length
        return SequenceResult(list(row.prompt), self.tokens[r, p:end].tolist(), row.nfe,
                              self.unmask[r, p:end].tolist(), self.eos_ids, self.logprob[r, p:end].tolist(),
                              row.computed)

    # ------------------------------------------------------------------ stepping
    # Inference mode (per thread, like grad mode: a serving thread must not build an autograd graph) also
    # skips the version counters and view tracking of no_grad: 5-10% of a CPU step on the tiny model.
    @torch.inference_mode()
    def step(self) -> StepReport:
        report = StepReport()
        plans = self.program.plan_all(self)
        live = [(row, plan) for row, plan in zip(self.rows, plans) if plan is not None]
        report.finished = [row for row, plan in zip(self.rows, plans) if plan is None]
        for row in report.finished:
            self._leave(row)
        if not live:
            if self.emit_outputs:
                report.outputs = [out for out in map(self._output, report.finished) if out]
            return report
        live.sort(key=lambda rp: rp[0].cache_row)
        rows, plans = [rp[0] for rp in live], [rp[1] for rp in live]
        steps = [row.nfe for row in rows]
        for row, plan in zip(rows, plans):
            row.nfe += 0 if plan.sits_out else 1
            row.computed += max(plan.end - plan.start, 0)
            if row.nfe > 2 * row.params.gen_length + 8:  # every step commits >= 1 slot: a bug, not a long decode
                row.error = (f"{self.program.name} took {row.nfe} forwards for {row.params.gen_length} slots without "
                             "finishing; the sampler failed to make progress (please report this)")
                row.finished = True
        committed = self.program.run_step(self, rows, plans, steps)
        self.forwards += 1
        report.forwarded = True
        for row, plan, slots in zip(rows, plans, committed):
            if not plan.sits_out:
                self.program.after(row, self, slots)
        done = [row for row in rows if row.finished]
        for row in done:
            row.finished = False
            self._leave(row)
        if self.emit_outputs:
            report.outputs = [out for out in map(self._output, report.finished + rows) if out]
        report.finished += done
        return report

    def _output(self, row: Row) -> RowOutput | None:
        """The row's news since its last output (None when there is none)."""
        ended = row.result is not None
        if row.finish_reason is not None:  # the answer was complete already: only its end is news
            return RowOutput(row, (), (), row.finish_reason, True) if ended else None
        if ended:
            tokens, logprobs = np.asarray(row.result.tokens), row.result.logprobs or ()
        else:
            r = row.cache_row
            tokens, logprobs = self.tokens[r, row.prompt_len: row.length], self.logprob[r, row.prompt_len: row.length]
        stop = (tokens == self.mask_id) | is_eos(tokens, self.eos_ids)
        hits = np.flatnonzero(stop)
        n = int(hits[0]) if len(hits) else len(tokens)
        reason = None
        if row.error:
            reason = "error"
        elif len(hits) and tokens[n] != self.mask_id:
            reason = "stop"
        elif ended:
            reason = "length"
        if n <= row.emitted and reason is None:
            return None
        new = slice(row.emitted, n)
        row.emitted, row.finish_reason = max(n, row.emitted), reason
        return RowOutput(row, tuple(int(t) for t in tokens[new]), tuple(float(x) for x in logprobs[new]), reason,
                         ended)

    def segment_step(self, rows: list[Row], plans: list[RowPlan], steps: list[int]) -> list[np.ndarray]:
        sizes = None
        if self.buckets:
            sizes = {"rows": self.max_rows, "capacity": self.capacity, "scratch_row": self.cache.scratch_row,
                     "pad_id": self.pad_id, "max_segments": max(r.params.gen_length // self._seg for r in rows)}
        step = build_segment_step(self.tokens, plans, self._seg, self.mask_id, [r.seed for r in rows], steps,
                                  any(self.program.wants_uniform(r.params) for r in rows), self.capacity, sizes,
                                  store=any(self.program.reads_cache(r.params) for r in rows),
                                  previous=self._last_step)
        self._last_step = step
        out = self.graphs.run(step) if self.graphs is not None else self._segment_device(self._eager_meta(step))
        return self.apply(self.fetch(out), step.layout, rows)

    def _eager_meta(self, step: HostStep) -> StepMeta:
        """The device views of an eager step. On the CPU the views alias the host arrays, so a step that
        reused the last one's arrays (same geometry) reuses its views too: only the candidate mask is redone."""
        last = self._eager
        if last is not None and last.parts is step.parts:
            torch.ne(last.cand, 0, out=last.meta.cand)
            row, shape = last.meta.row, step.shape
            if (row.host_min, row.host_max) != (shape.host_min, shape.host_max):
                last.meta = replace(last.meta, row=replace(row, host_min=shape.host_min, host_max=shape.host_max))
            return last.meta
        dev = self.packer.upload(step.parts)
        meta = segment_meta(dev, step.shape, self.device)
        aliased = self.device.type == "cpu" and all(  # an empty part has nothing to alias
            dev[k].data_ptr() == step.parts[k].ctypes.data
            for k in DYNAMIC_PARTS if k in step.parts and step.parts[k].size)
        self._eager = _EagerStep(step.parts, dev["cand"].view(meta.cand.shape), meta) if aliased else None
        return meta

    def _captured_step(self, buffer: torch.Tensor, spec: StepSpec) -> torch.Tensor:
        """The device part as a pure function of the step's static buffer (what a graph captures)."""
        return self._segment_device(segment_meta(spec.split(buffer), spec.shape, self.device))

    def _segment_device(self, meta: StepMeta) -> torch.Tensor:
        logits = self.model.forward_windows(meta.windows, self.cache)
        keys = None
        if meta.seeds is not None:
            keys = cell_keys(meta.seeds, meta.steps, meta.windows.head_slots)
        stats = token_stats(logits, meta.temperature, keys, self.program.needs_entropy, forbid=self.mask_id)
        n, ns, seg = meta.layout

        def spread(values: torch.Tensor | None, fill) -> torch.Tensor | None:
            if values is None:
                return None
            if meta.pad_pos is None:
                return values.view(n, ns, seg)
            full = values.new_full((n * ns * seg,), fill)
            full[meta.pad_pos] = values
            return full.view(n, ns, seg)

        uniform = spread(uniform_per_cell(keys), 0.0) if meta.uniform else None
        cells = Cells(spread(stats.tokens, 0), spread(stats.conf, -1.0), spread(stats.logprob, 0.0),
                      spread(stats.entropy, float("inf")), meta.cand, meta.flags, meta.row, uniform)
        take = self.program.rule(cells)
        return pack_decisions(take, cells.tokens, cells.logprob)

    def fetch(self, out: torch.Tensor) -> np.ndarray:
        """The step's one device-to-host transfer."""
        return self.packer.link.to_host(out)

    def apply(self, decisions: np.ndarray, layout: HostLayout, rows: list[Row]) -> list[np.ndarray]:
        """Write a segment step's decisions into the host state (unmask step: the row's nfe - 1)."""
        tok, lp = decisions[0], decisions[1].view(np.float32)
        if layout.pad_pos is None:  # the layout is in transfer order; bucketed steps append padding rows
            cells = np.nonzero(tok[: len(rows) * layout.ns * layout.seg] >= 0)[0]
            at = cells
        else:
            cells = np.nonzero(tok[layout.pad_pos] >= 0)[0]
            at = layout.pad_pos[cells]
        r, slots = layout.cell_rows[cells], layout.cell_slots[cells]
        self.tokens[r, slots] = tok[at]
        self.unmask[r, slots] = np.array([row.nfe - 1 for row in rows], dtype=np.int64)[r]
        self.logprob[r, slots] = lp[at]
        if len(rows) == 1:
            return [slots]
        return np.split(slots, np.searchsorted(r, np.arange(1, len(rows))))


def pack_decisions(take: torch.Tensor, tokens: torch.Tensor, logprob: torch.Tensor) -> torch.Tensor:
    chosen = torch.where(take, tokens, -1).to(torch.int32).reshape(-1)
    return torch.stack([chosen, logprob.float().reshape(-1).view(torch.int32)])


def is_eos(tokens: np.ndarray, eos_ids: Sequence[int]) -> np.ndarray:
    """``np.isin(tokens, eos_ids)`` for the one or two EOS ids a model has, without its setup cost."""
    hit = np.zeros(tokens.shape, dtype=bool)
    for eos in eos_ids:
        hit |= tokens == eos
    return hit
