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

``window="canvas"`` (the default) is the reference above: every step recomputes every slot from the
cached length to the end of the canvas, blocks not yet created included. ``window="blocks"`` computes
only the created blocks (plus ``lookahead`` blocks) each step:

* the all-mask suffix past them is left out of attention (``suffix="drop"``, the default, as
  block-diffusion models decode) or read from the cache (``suffix="cache"``: its K/V come from the
  row's first forward, which covers the whole canvas, as Fast-dLLM's dual cache reads its suffix).
  Chosen by measurement (docs/benchmarks.md, ``benchmarks/window_eval.py``): on the tiny teacher at its
  longest canvas (80 slots) dropping the suffix computes 0.38x the reference's token-forwards and
  answers 18-20 points better (the all-mask suffix is what the model reads badly on a canvas longer than
  it was trained on); at the trained length (48) it costs 1.8-4.0 points, reading the suffix from the
  cache 1.8-2.2;
* a newly completed unit is not refreshed by recomputing the row: the stale part (completed units
  not yet committed to the cache) lies inside the window already, so the cached prefix and the mask
  suffix are left alone; ``refresh_interval`` still recomputes the prefix, never the suffix.

With ``early_stop`` the first committed EOS ends the answer: every slot after it becomes
EOS, no new block is created, and the row stops once nothing before it is masked.

Both block thresholds at 1.0 reduce this to single-block entropy-threshold decoding.
The threshold is a per-row parameter: rows with different values share a step.

Commit rule per architecture, as the official code has it (``commit_rule``; None picks it
from the model family):

* ``llada`` (``generate_multi_block*`` in d3llm_llada_generate_util.py): commit every in-flight
  masked token with ``H <= threshold`` and always the single lowest-entropy in-flight one, even
  above the threshold and in a block that is not fully activated;
* ``dream`` (``_sample_multi_block*`` in d3llm_dream_generate_util.py): ``H < threshold``, no
  unconditional token.
Both then force the lowest-entropy token of the first fully-activated block with masks when
nothing in it committed.

Cache timing follows the reference: a unit's delay counts forwards from the first forward that
starts with it complete (the prompt counts from 0), and the periodic refresh fires on forwards
whose number is a multiple of ``refresh_interval``. ``benchmarks/d3llm_fidelity.py`` runs the
official LLaDA code beside this one: on 50 held-out prompts the LLaDA rule gives the reference's
tokens on 49-50 and its NFE on 47-50 (docs/benchmarks.md).

Deliberate differences from the reference code:

* batches: rows keep their own block states and cache lengths (the reference is batch 1);
* the cache keeps one authoritative length per row; the reference can append a block's K/V
  twice after a refresh that truncates past its manual cache length (research/d3llm.md §2.4);
* NFE counts forwards; the reference counts one more when the EOS fill completes the answer
  (it increments before its early-stop check and then leaves without a forward);
* on the step whose EOS fill is new, the reference's candidates still include the slots just
  filled (its mask is taken before the fill), so its unconditional token can land on one of
  them and be overwritten; here candidates are taken after the fill;
* every id in the model's ``eos_ids`` ends the answer (the reference takes one id);
* entropy is float32 ``logsumexp - <p, z>`` on max-shifted logits, where the reference uses
  float64 ``-sum p log(p + 1e-12)``; ties and values within ~1e-6 of the threshold may differ;
* Dream sampling is Gumbel-max (the reference's Dream path uses ``multinomial``), with
  per-row counter-based noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from d3core.samplers.base import BlockParams, GenerationResult, check_probability
from d3core.samplers.engine import Decoder, Program, Row, is_eos
from d3core.samplers.generation import OnStep, run
from d3core.samplers.plan import Cells, RowPlan


@dataclass(frozen=True)
class D3LLMParams(BlockParams):
    threshold: float = 0.5
    block_add_threshold: float = 0.1
    decoded_token_threshold: float = 0.95
    cache_delay_iter: int | None = None  # None: no KV cache
    refresh_interval: int | None = None  # None: no periodic refresh
    early_stop: bool = True
    commit_rule: str | None = None  # "llada" | "dream"; None: the model family's rule
    window: str = "canvas"  # "canvas": recompute to the canvas's end (the reference); "blocks": in-flight blocks only
    suffix: str | None = None  # with window="blocks": the all-mask suffix is "drop"ped (default) or read from "cache"
    lookahead: int = 0  # with window="blocks": blocks past the newest one recomputed anyway

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
        if self.window not in WINDOWS:
            raise ValueError(f"window={self.window!r}: must be one of {WINDOWS} (canvas: the reference; blocks: "
                             "the in-flight blocks only)")
        if self.suffix is not None and self.suffix not in SUFFIXES:
            raise ValueError(f"suffix={self.suffix!r}: must be one of {SUFFIXES}, or None (with window='blocks': "
                             "drop)")
        if self.lookahead < 0:
            raise ValueError(f"lookahead={self.lookahead}: must be >= 0 blocks")
        if self.window == "canvas" and (self.suffix is not None or self.lookahead):
            raise ValueError(f"suffix={self.suffix!r}, lookahead={self.lookahead} apply to window='blocks' only: "
                             "set window='blocks' or leave them at their defaults")
        if self.commit_rule is not None and self.commit_rule not in COMMIT_RULES:
            raise ValueError(f"commit_rule={self.commit_rule!r}: must be one of {COMMIT_RULES}, or None for the "
                             "model family's rule")


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
    block_length: int = 1
    masks: list[int] = field(default_factory=list)  # masked slots per block, kept up to date by ``after``
    first_eos: int | None = None  # generation index of the first committed EOS (with early stop)

    def __post_init__(self) -> None:
        self.fully = [True] + [False] * (self.num_blocks - 1)
        self.completed_at = [0] + [None] * self.num_blocks
        self.masks = [self.block_length] * self.num_blocks  # a row starts all masked


FORCED = 1  # segment flag: the row's first fully-activated block with masks
COMMIT_RULES = ("llada", "dream")
WINDOWS = ("canvas", "blocks")
SUFFIXES = ("cache", "drop")
LLADA, DREAM = 1, 0  # per-row rule codes on the device


def commit_rule(params: "D3LLMParams", arch: str) -> int:
    """The rule code for ``params`` on a model of family ``arch`` (Dream's rule for Dream, LLaDA's otherwise)."""
    name = params.commit_rule or ("dream" if arch == "dream" else "llada")
    return LLADA if name == "llada" else DREAM


class D3LLMProgram(Program):
    name = "d3llm"
    needs_entropy = True

    def init_row(self, row: Row, d: Decoder) -> None:
        row.state = _Blocks(row.params.num_blocks, block_length=row.params.block_length)

    def reads_cache(self, params: D3LLMParams) -> bool:
        return params.cache_delay_iter is not None or params.suffix == "cache"

    def plan(self, row: Row, d: Decoder) -> RowPlan | None:
        st, p = row.state, row.params
        if p.early_stop and st.first_eos is not None:
            _handle_eos(st, row, d, p.block_length)
        masks = st.masks
        _advance_blocks(st, masks, p)
        if sum(masks) == 0 and (st.created == p.num_blocks or st.eos_stop):
            return None
        start = 0
        if p.cache_delay_iter is not None:
            start = _plan_cache(st, masks, p, row.prompt_len, row.nfe + 1)
        end = keys = row.length
        if p.window == "blocks":
            end = min(row.prompt_len + (st.created + p.lookahead) * p.block_length, row.length)
            if p.suffix != "cache":  # drop, the default
                keys = end
            elif row.nfe == 0:
                end = row.length  # the first forward computes the whole canvas: the suffix's K/V come from it
        live = [k for k in range(st.created) if masks[k] > 0]
        forced = next((k for k in live if st.fully[k]), None)
        llada = commit_rule(p, d.model.config.arch) == LLADA
        return RowPlan(start, end, keys, [row.prompt_len + k * p.block_length for k in live],
                       flags=[FORCED if k == forced else 0 for k in live],
                       params={"llada_rule": llada, "threshold": p.threshold}, temperature=p.temperature)

    def rule(self, cells: Cells) -> torch.Tensor:
        h, cand = cells.entropy, cells.cand
        n, ns, seg = cand.shape
        threshold = cells.row["threshold"][:, None, None].to(h.dtype)
        any_llada, any_dream = cells.row.any("llada_rule"), not cells.row.all("llada_rule")
        llada = cells.row["llada_rule"][:, None, None] > 0
        if not any_dream:
            take = cand & (h <= threshold)
        elif not any_llada:
            take = cand & (h < threshold)
        else:
            take = cand & torch.where(llada, h <= threshold, h < threshold)
        scores = torch.where(cand, h, torch.full_like(h, float("inf")))
        if any_llada:  # the lowest-entropy in-flight candidate of each LLaDA row, unconditionally
            lowest = scores.view(n, ns * seg).argmin(-1, keepdim=True)
            keep = torch.zeros_like(take).view(n, ns * seg).scatter_(-1, lowest, True).view(n, ns, seg)
            take |= keep & cand & llada
        need = (cells.flags == FORCED) & ~take.any(-1)
        best = scores.argmin(-1, keepdim=True)
        forced = torch.zeros_like(take).scatter_(-1, best, True) & cand & need[..., None]
        return take | forced

    def after(self, row: Row, d: Decoder, committed: np.ndarray) -> None:
        st, p = row.state, row.params
        st.cache_len = st.target
        masks = st.masks
        for slot in committed.tolist():  # each commit fills one masked slot
            masks[(slot - row.prompt_len) // p.block_length] -= 1
        if p.early_stop and len(committed):
            eos = committed[is_eos(d.tokens[row.cache_row, committed], d.eos_ids)]
            if len(eos):
                first = int(eos.min()) - row.prompt_len
                st.first_eos = first if st.first_eos is None else min(st.first_eos, first)
        for k in range(st.created):
            if masks[k] == 0 and st.completed_at[k + 1] is None:
                st.completed_at[k + 1] = row.nfe + 1  # the first forward that starts with it complete


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


def _handle_eos(st: _Blocks, row: Row, d: Decoder, bl: int) -> None:
    """The first committed EOS ends the answer: later slots become EOS, later blocks count as complete."""
    first = st.first_eos
    st.eos_stop = True
    d.fill_eos(row, first + 1, max(row.nfe - 1, 0), overwrite=True)
    gen, _ = d.gen(row)
    st.masks = (gen == d.mask_id).reshape(st.num_blocks, bl).sum(1).tolist()  # the fill ended masked slots
    for k in range(st.num_blocks):
        if k * bl > first and st.completed_at[k + 1] is None:
            st.completed_at[k + 1] = row.nfe + 1
    st.created = max(st.created, first // bl + 1)


def _plan_cache(st: _Blocks, masks: list[int], p: D3LLMParams, prompt_len: int, forward: int) -> int:
    """Commit newly stable units, refresh while units stabilize, or read; returns the window start.

    ``forward`` is the number (from 1) of the forward being planned; ``completed_at`` holds, per
    unit, the first forward that started with it complete (the prompt: 0), as in the reference.
    """
    unit_end = [prompt_len] + [prompt_len + (k + 1) * p.block_length for k in range(p.num_blocks)]
    units = len(unit_end)
    complete = [u == 0 or (u <= st.created and masks[u - 1] == 0) for u in range(units)]
    to_cache = st.cached_units
    while (to_cache < units and complete[to_cache] and st.completed_at[to_cache] is not None
           and forward - st.completed_at[to_cache] >= p.cache_delay_iter):
        to_cache += 1
    stabilizing = []  # complete units right after the cached ones, still waiting out the delay
    while to_cache + len(stabilizing) < units and complete[to_cache + len(stabilizing)]:
        stabilizing.append(to_cache + len(stabilizing))
    periodic = p.refresh_interval is not None and forward % p.refresh_interval == 0
    start, st.target = st.cache_len, st.cache_len
    if to_cache > st.cached_units:
        st.cached_units = to_cache
        st.target = unit_end[to_cache - 1]
    elif st.cached_units > 0 and (periodic or (stabilizing and p.window == "canvas")):
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
    """Decode ``prompts``; ``on_step`` (if given) sees a :class:`~d3core.samplers.generation.Snapshot` per step."""
    return run(D3LLMProgram(), model, prompts, params, generator, on_step)
