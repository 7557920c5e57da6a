"""``d3llm``: entropy-based multi-block decoding with a delayed prefix KV cache and refresh.

Several blocks are in flight at once (d3LLM, research/d3llm.md §2):

* a block is *activated* when created: only its tokens with entropy ``< threshold`` commit;
* the next block is created (at most one per step) once the newest block's progress
  (committed fraction) reaches ``block_add_threshold``;
* a block becomes *fully activated* once its predecessor's progress reaches
  ``decoded_token_threshold``; in the first fully-activated block with masks at least its
  lowest-entropy token commits every step, which guarantees progress.

The delayed cache: a completed block (the prompt counts as block 0, completed at step 0)
enters the prefix cache after it has stayed complete for ``cache_delay_iter`` forwards.
While a completed block waits ("stabilizing") every step is a *refresh*: a full forward
whose K/V are re-cached up to the newest stabilizing block; ``refresh_interval`` adds a
periodic refresh. Otherwise a step runs only the uncached window (active blocks and the
masked future) against the cache. Each row keeps one authoritative cache length.

With ``early_stop`` the first committed EOS ends the answer: every slot after it becomes
EOS, no new block is created, and the row stops once nothing before it is masked.

Both block thresholds at 1.0 reduce this to single-block entropy-threshold decoding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from d3core.cache import KVCache
from d3core.samplers.base import (
    GenerationResult,
    begin,
    check_blocks,
    check_probability,
    choose_tokens,
    entropy,
    finish,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class D3LLMParams:
    gen_length: int = 48
    block_length: int = 16
    threshold: float = 0.5
    block_add_threshold: float = 0.1
    decoded_token_threshold: float = 0.95
    cache_delay_iter: int | None = None  # None: no KV cache
    refresh_interval: int | None = None  # None: no periodic refresh
    early_stop: bool = True
    temperature: float = 0.0

    def __post_init__(self) -> None:
        check_blocks(self.gen_length, self.block_length)
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
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 is argmax)")


class _Row:
    """Block state machine of one sequence (unit 0 is the prompt, unit b+1 generation block b)."""

    def __init__(self, num_blocks: int) -> None:
        self.created = 1
        self.fully = [True] + [False] * (num_blocks - 1)
        self.completed_at: list[int | None] = [0] + [None] * num_blocks  # per unit
        self.cached_units = 0
        self.eos_stop = False
        self.done = False
        self.nfe = 0


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    params: D3LLMParams = D3LLMParams(),
    generator: torch.Generator | None = None,
    on_step: Callable[[torch.Tensor], None] | None = None,
) -> GenerationResult:
    """Decode ``prompts``; ``on_step`` (if given) sees the generation slots after every step.

    ``on_step`` receives a view (do not modify it) of shape ``(B, gen_length)`` in which ``mask_id`` marks
    undecided slots. A committed token never changes afterwards, so the contiguous committed
    prefix of a row (up to its first EOS) is final and safe to stream. Clone the tensor to keep
    it; an exception the hook raises aborts decoding and propagates to the caller.
    """
    cfg = model.config
    batch, t0 = begin(model, prompts, params.gen_length)
    device = batch.x.device
    x, pos, attn, p0 = batch.x, batch.positions, batch.attention_mask, batch.prompt_len
    b, total = x.shape
    bl, nb = params.block_length, params.gen_length // params.block_length
    eos_ids = torch.tensor(cfg.eos_ids, device=device)
    rows = [_Row(nb) for _ in range(b)]
    unmask_step = torch.full((b, params.gen_length), -1, dtype=torch.long, device=device)
    use_cache = params.cache_delay_iter is not None
    cache = KVCache.for_model(model, b, total) if use_cache else None
    unit_end = [p0] + [p0 + (k + 1) * bl for k in range(nb)]
    forwards = 0
    # Finished rows leave the batch (their outputs are kept in these full-batch buffers), so a
    # batch costs forwards over the rows still decoding, not over the slowest row's lifetime.
    out_gen, out_steps, out_nfe = x[:, p0:].clone(), unmask_step.clone(), [0] * b
    index = list(range(b))  # batch row -> original prompt index
    while True:
        gen = x[:, p0:]
        if params.early_stop:
            _handle_eos(x, p0, eos_ids, cfg.mask_id, rows, unmask_step, bl)
            gen = x[:, p0:]
        masks = (gen == cfg.mask_id).view(b, nb, bl).sum(-1).tolist()
        active_end = []
        for r, row in enumerate(rows):
            if not row.done:
                _advance_blocks(row, masks[r], bl, nb, params)
                row.done = sum(masks[r]) == 0 and (row.created == nb or row.eos_stop)
            active_end.append(p0 + row.created * bl)
        if any(row.done for row in rows):
            keep = [r for r, row in enumerate(rows) if not row.done]
            for r, row in enumerate(rows):
                if row.done:
                    out_gen[index[r]], out_steps[index[r]], out_nfe[index[r]] = x[r, p0:], unmask_step[r], row.nfe
            if not keep:
                break
            sel = torch.tensor(keep, device=device)
            x, pos, attn, unmask_step = x[sel], pos[sel], attn[sel], unmask_step[sel]
            rows, index = [rows[r] for r in keep], [index[r] for r in keep]
            active_end, masks = [active_end[r] for r in keep], [masks[r] for r in keep]
            cache = cache.select(sel) if cache is not None else None
            b, gen = len(keep), x[:, p0:]
        live = torch.ones(b, dtype=torch.bool, device=device)
        if cache is not None:
            targets = _plan_cache(rows, masks, params, unit_end, cache, device)
            start = cache.length
            window = model(x[:, start:], pos[:, start:], attn[:, start:], cache=cache, commit=targets)
            if start <= p0:
                logits = window[:, p0 - start:]
            else:  # slots before the window are cached, hence committed: no logits needed there
                logits = window.new_zeros(b, params.gen_length, window.shape[-1])
                logits[:, start - p0:] = window
        else:
            logits = model(x, pos, attn)[:, p0:]
        forwards += 1
        for r, row in enumerate(rows):
            row.nfe += int(not row.done)
        nfe = torch.tensor([row.nfe for row in rows], device=device)
        tokens, _ = choose_tokens(logits, params.temperature, generator)
        h = entropy(logits)
        slots = torch.arange(params.gen_length, device=device)
        in_flight = slots[None] < (torch.tensor(active_end, device=device) - p0)[:, None]
        cand = (gen == cfg.mask_id) & in_flight & live[:, None]
        take = cand & (h < params.threshold)
        take |= _forced(rows, cand, take, h, bl, nb)
        x[:, p0:] = torch.where(take, tokens, gen)
        unmask_step = torch.where(take, (nfe - 1)[:, None], unmask_step)
        masks_after = (x[:, p0:] == cfg.mask_id).view(b, nb, bl).sum(-1).tolist()
        for r, row in enumerate(rows):
            for k in range(row.created):
                if masks_after[r][k] == 0 and row.completed_at[k + 1] is None:
                    row.completed_at[k + 1] = row.nfe
        if on_step is not None:
            out_gen[index] = x[:, p0:]
            on_step(out_gen)
    return finish("d3llm", prompts, out_gen, out_nfe, out_steps, cfg.eos_ids, t0, batch_forwards=forwards)


def _advance_blocks(row: _Row, masks: list[int], bl: int, nb: int, params: D3LLMParams) -> None:
    progress = [1.0] + [1 - m / bl for m in masks]  # unit-indexed: progress[k + 1] is block k
    for k in range(1, row.created):
        if not row.fully[k] and progress[k] >= params.decoded_token_threshold:
            row.fully[k] = True
    if row.created < nb and not row.eos_stop:
        last = progress[row.created]
        if last >= params.block_add_threshold or masks[row.created - 1] == 0:
            row.fully[row.created] = last >= params.decoded_token_threshold
            row.created += 1


def _forced(rows, cand, take, h, bl, nb) -> torch.Tensor:
    """In each row's first fully-activated block with masks, its lowest-entropy token if none passed."""
    forced = torch.zeros_like(take)
    for r, row in enumerate(rows):
        if row.done:
            continue
        for k in range(row.created):
            seg = cand[r, k * bl:(k + 1) * bl]
            if row.fully[k] and bool(seg.any()):
                if not bool(take[r, k * bl:(k + 1) * bl].any()):
                    scores = torch.where(seg, h[r, k * bl:(k + 1) * bl], torch.full_like(seg, float("inf"),
                                                                                           dtype=h.dtype))
                    forced[r, k * bl + int(scores.argmin())] = True
                break
    return forced


def _handle_eos(x, p0, eos_ids, mask_id, rows, unmask_step, bl) -> None:
    gen = x[:, p0:]
    is_eos = torch.isin(gen, eos_ids)
    for r in torch.nonzero(is_eos.any(-1)).flatten().tolist():
        row = rows[r]
        if row.done:
            continue
        first = int(is_eos[r].float().argmax())
        row.eos_stop = True
        tail = torch.zeros_like(is_eos[r])
        tail[first + 1:] = True
        newly = tail & (gen[r] == mask_id)
        unmask_step[r] = torch.where(newly, torch.full_like(unmask_step[r], max(row.nfe - 1, 0)), unmask_step[r])
        gen[r, first + 1:] = eos_ids[0]
        for k in range(len(row.fully)):
            if k * bl > first and row.completed_at[k + 1] is None:
                row.completed_at[k + 1] = row.nfe
        row.created = max(row.created, (first // bl) + 1)


def _plan_cache(rows, masks, params: D3LLMParams, unit_end, cache: KVCache, device) -> torch.Tensor:
    """Per row: commit newly stable blocks, refresh while blocks stabilize, or read the cache."""
    targets = cache.row_length.clone()
    truncate = []
    for r, row in enumerate(rows):
        if row.done:
            continue
        units = len(unit_end)
        complete = [u == 0 or (u <= row.created and masks[r][u - 1] == 0) for u in range(units)]
        to_cache = row.cached_units
        while (to_cache < units and complete[to_cache] and row.completed_at[to_cache] is not None
               and row.nfe - row.completed_at[to_cache] >= params.cache_delay_iter):
            to_cache += 1
        stabilizing = []  # completed blocks right after the cached ones, still waiting out the delay
        while to_cache + len(stabilizing) < units and complete[to_cache + len(stabilizing)]:
            stabilizing.append(to_cache + len(stabilizing))
        periodic = params.refresh_interval is not None and row.nfe > 0 and row.nfe % params.refresh_interval == 0
        if to_cache > row.cached_units:
            row.cached_units = to_cache
            targets[r] = unit_end[to_cache - 1]
        elif row.cached_units > 0 and (stabilizing or periodic):
            refresh_units = stabilizing[-1] if stabilizing else row.cached_units
            truncate.append(r)
            row.cached_units = refresh_units
            targets[r] = unit_end[refresh_units - 1] if refresh_units else 0
    if truncate:
        limit = cache.row_length.clone()
        limit[truncate] = 0
        cache.truncate(limit)
    return targets
