"""``d3llm``: entropy-based multi-block decoding with a delayed prefix KV cache and refresh.

Several blocks are in flight at once (d3LLM, research/d3llm.md §2):

* a block is *activated* when created: only its tokens with entropy ``< threshold`` commit;
* the next block is created (at most one per step) once the newest block's progress
  (committed fraction) reaches ``block_add_threshold``;
* a block becomes *fully activated* once its predecessor's progress reaches
  ``decoded_token_threshold``; in the first fully-activated block with masks at least its
  lowest-entropy token commits every step, which guarantees progress.

The delayed cache, per row (one authoritative cached length, a host int)::

    units:   [prompt][block 0][block 1][block 2] ...        (the prompt is unit 0, complete at step 0)
    cached:  every unit complete for >= cache_delay_iter forwards, left to right
    step:    a unit newly past its delay  -> commit: the window [cached, end) is recomputed and
                                             the cached length grows to the unit's end
             a complete unit still waiting -> refresh: the window is the whole row [0, end) and
                                             the cache is rebuilt up to the newest waiting unit
             otherwise                     -> read: the window is [cached, end)
    (``refresh_interval`` adds a periodic refresh.)

A refreshing row recomputes its whole sequence; the other rows of the step keep their own
short windows (windows are per row, see :mod:`d3core.cache`).

With ``early_stop`` the first committed EOS ends the answer: every slot after it becomes
EOS, no new block is created, and the row stops once nothing before it is masked.

Both block thresholds at 1.0 reduce this to single-block entropy-threshold decoding.
The threshold is a per-row parameter: rows with different values share a step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from d3core.samplers.base import BlockParams, GenerationResult, check_probability
from d3core.samplers.engine import Decoder, OnStep, Program, Row, run
from d3core.samplers.packing import Cells, RowPlan

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class D3LLMParams(BlockParams):
    threshold: float = 0.5
    block_add_threshold: float = 0.1
    decoded_token_threshold: float = 0.95
    cache_delay_iter: int | None = None  # None: no KV cache
    refresh_interval: int | None = None  # None: no periodic refresh
    early_stop: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.threshold >= 0:
            raise ValueError(f"threshold={self.threshold}: an entropy threshold must be >= 0 nats")
        check_probability("block_add_threshold", self.block_add_threshold)
        check_probability("decoded_token_threshold", self.decoded_token_threshold)
        if self.cache_delay_iter is not None and self.cache_delay_iter < 0:
            raise ValueError(f"cache_delay_iter={self.cache_delay_iter}: must be >= 0, or None for no cache")
        if self.refresh_interval is not None and self.refresh_interval <= 0:
            raise ValueError(f"refresh_interval={self.refresh_interval}: must be > 0, or None for no periodic refresh")
        if self.refresh_interval is not None and self.cache_delay_iter is None:
            raise ValueError("refresh_interval needs the cache: set cache_delay_iter too")


@dataclass
class _Blocks:
    """One row's block state machine; ``completed_at`` is indexed by unit (unit 0 is the prompt)."""

    num_blocks: int
    created: int = 1
    fully: list[bool] = field(default_factory=list)
    completed_at: list[int | None] = field(default_factory=list)
    cached_units: int = 0
    cache_len: int = 0  # slots [0, cache_len) are authoritative in the KV cache
    target: int = 0  # cache_len after the planned forward
    eos_stop: bool = False

    def __post_init__(self) -> None:
        self.fully = [True] + [False] * (self.num_blocks - 1)
        self.completed_at = [0] + [None] * self.num_blocks


FORCED = 1  # segment flag: the row's first fully-activated block with masks


class D3LLMProgram(Program):
    name = "d3llm"
    needs_entropy = True

    def init_row(self, row: Row, d: Decoder) -> None:
        row.state = _Blocks(row.params.num_blocks)

    def plan(self, row: Row, d: Decoder) -> RowPlan | None:
        st, p = row.state, row.params
        gen, unmask = d.gen(row)
        if p.early_stop:
            _handle_eos(st, row.nfe, gen, unmask, d, p.block_length)
        masks = (gen == d.mask_id).reshape(p.num_blocks, p.block_length).sum(1).tolist()
        _advance_blocks(st, masks, p)
        if sum(masks) == 0 and (st.created == p.num_blocks or st.eos_stop):
            return None
        start = 0
        if p.cache_delay_iter is not None:
            start = _plan_cache(st, masks, p, row.prompt_len, row.nfe)
        live = [k for k in range(st.created) if masks[k] > 0]
        forced = next((k for k in live if st.fully[k]), None)
        return RowPlan(start, row.length, row.length, [row.prompt_len + k * p.block_length for k in live],
                       flags=[FORCED if k == forced else 0 for k in live], floats=(p.threshold,),
                       temperature=p.temperature)

    def rule(self, cells: Cells) -> torch.Tensor:
        h, cand = cells.entropy, cells.cand
        take = cand & (h < cells.floats[:, 0, None, None].to(h.dtype))
        need = (cells.flags == FORCED) & ~take.any(-1)
        best = torch.where(cand, h, torch.full_like(h, float("inf"))).argmin(-1, keepdim=True)
        forced = torch.zeros_like(take).scatter_(-1, best, True) & cand & need[..., None]
        return take | forced

    def after(self, row: Row, d: Decoder, committed: np.ndarray) -> None:
        st, p = row.state, row.params
        st.cache_len = st.target
        gen, _ = d.gen(row)
        masks_after = (gen == d.mask_id).reshape(p.num_blocks, p.block_length).sum(1)
        for k in range(st.created):
            if masks_after[k] == 0 and st.completed_at[k + 1] is None:
                st.completed_at[k + 1] = row.nfe


def _advance_blocks(st: _Blocks, masks: list[int], p: D3LLMParams) -> None:
    bl, nb = p.block_length, p.num_blocks
    progress = [1.0] + [1 - m / bl for m in masks]  # unit-indexed: progress[k + 1] is block k
    for k in range(1, st.created):
        if not st.fully[k] and progress[k] >= p.decoded_token_threshold:
            st.fully[k] = True
    if st.created < nb and not st.eos_stop:
        last = progress[st.created]
        if last >= p.block_add_threshold or masks[st.created - 1] == 0:
            st.fully[st.created] = last >= p.decoded_token_threshold
            st.created += 1


def _handle_eos(st: _Blocks, nfe: int, gen: np.ndarray, unmask: np.ndarray, d: Decoder, bl: int) -> None:
    """The first committed EOS ends the answer: later slots become EOS, later blocks count as complete."""
    eos_at = np.nonzero(np.isin(gen, d.eos_ids))[0]
    if len(eos_at) == 0:
        return
    first = int(eos_at[0])
    st.eos_stop = True
    newly = gen[first + 1:] == d.mask_id
    unmask[first + 1:][newly] = max(nfe - 1, 0)
    gen[first + 1:] = d.eos_ids[0]
    for k in range(st.num_blocks):
        if k * bl > first and st.completed_at[k + 1] is None:
            st.completed_at[k + 1] = nfe
    st.created = max(st.created, first // bl + 1)


def _plan_cache(st: _Blocks, masks: list[int], p: D3LLMParams, prompt_len: int, nfe: int) -> int:
    """Commit newly stable units, refresh while units stabilize, or read; returns the window start."""
    unit_end = [prompt_len] + [prompt_len + (k + 1) * p.block_length for k in range(p.num_blocks)]
    units = len(unit_end)
    complete = [u == 0 or (u <= st.created and masks[u - 1] == 0) for u in range(units)]
    to_cache = st.cached_units
    while (to_cache < units and complete[to_cache] and st.completed_at[to_cache] is not None
           and nfe - st.completed_at[to_cache] >= p.cache_delay_iter):
        to_cache += 1
    stabilizing = []  # complete units right after the cached ones, still waiting out the delay
    while to_cache + len(stabilizing) < units and complete[to_cache + len(stabilizing)]:
        stabilizing.append(to_cache + len(stabilizing))
    periodic = p.refresh_interval is not None and nfe > 0 and nfe % p.refresh_interval == 0
    start, st.target = st.cache_len, st.cache_len
    if to_cache > st.cached_units:
        st.cached_units = to_cache
        st.target = unit_end[to_cache - 1]
    elif st.cached_units > 0 and (stabilizing or periodic):
        refresh_units = stabilizing[-1] if stabilizing else st.cached_units
        st.cached_units = refresh_units
        start = 0
        st.target = unit_end[refresh_units - 1] if refresh_units else 0
    return start


def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    params: D3LLMParams = D3LLMParams(),
    generator: torch.Generator | None = None,
    on_step: OnStep | None = None,
    verifier: torch.nn.Module | None = None,
) -> GenerationResult:
    """Decode ``prompts``; ``on_step`` (if given) sees a :class:`~d3core.samplers.engine.Snapshot` per step."""
    return run(D3LLMProgram(), model, prompts, params, generator, on_step)
