"""Single-block threshold decoding with an optional approximate KV cache.

The engine behind ``fast_dllm`` (confidence threshold or factor rule) and ``dparallel``
(entropy threshold): blocks are decoded left to right; within the current block each step
commits every masked position that passes the sampler's rule, and always at least one.

Cache modes (Fast-dLLM):
  * ``none``   every step runs the whole sequence;
  * ``prefix`` the first step of a block runs the whole sequence and caches the K/V of
    everything left of the block; later steps run the block and the masked suffix only;
  * ``dual``   the first step caches every slot; later steps run the block alone, attending
    to the cached prefix and the cached (still masked) suffix.
The first step of a block is a full forward in both cached modes, so its tokens equal the
uncached path's; later steps read K/V computed before the block's newest tokens existed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from d3core.cache import KVCache
from d3core.samplers.base import GenerationResult, begin, check_blocks, choose_tokens, finish

logger = logging.getLogger(__name__)

CACHE_MODES = ("none", "prefix", "dual")

# select(logits, tokens, confidence, masked) -> bool (B, block) of positions to commit
SelectFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BlockwiseParams:
    gen_length: int = 48
    block_length: int = 16
    temperature: float = 0.0
    cache: str = "none"
    early_stop: bool = True

    def __post_init__(self) -> None:
        check_blocks(self.gen_length, self.block_length)
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 is argmax)")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"cache={self.cache!r}: must be one of {CACHE_MODES}")


def with_best(take: torch.Tensor, score: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """``take`` plus, in every row with a masked position, the masked position of highest ``score``."""
    best = torch.where(masked, score, torch.full_like(score, -float("inf"))).argmax(-1, keepdim=True)
    forced = torch.zeros_like(take).scatter_(-1, best, True) & masked
    return (take & masked) | forced


def finish_rows(x: torch.Tensor, p0: int, eos_ids: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Rows whose generation holds a committed EOS with every slot before it committed."""
    gen = x[:, p0:]
    is_eos = torch.isin(gen, eos_ids)
    masked = gen == mask_id
    first_eos = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), torch.full_like(gen[:, 0], gen.shape[1]))
    slots = torch.arange(gen.shape[1], device=x.device)
    masked_before = (masked & (slots[None] < first_eos[:, None])).any(-1)
    return is_eos.any(-1) & ~masked_before


@torch.no_grad()
def decode(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    params: BlockwiseParams,
    select: SelectFn,
    name: str,
    generator: torch.Generator | None = None,
) -> GenerationResult:
    cfg = model.config
    batch, t0 = begin(model, prompts, params.gen_length)
    device = batch.x.device
    x, pos, attn, p0 = batch.x, batch.positions, batch.attention_mask, batch.prompt_len
    b, total = x.shape
    eos = torch.tensor(cfg.eos_ids, device=device)
    unmask_step = torch.full((b, params.gen_length), -1, dtype=torch.long, device=device)
    nfe = torch.zeros(b, dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    cache = KVCache.for_model(model, b, total) if params.cache != "none" else None
    forwards = 0
    for blk in range(params.gen_length // params.block_length):
        lo, hi = p0 + blk * params.block_length, p0 + (blk + 1) * params.block_length
        first_step = True
        while True:
            masked = (x[:, lo:hi] == cfg.mask_id) & ~finished[:, None]
            active = masked.any(-1)
            if not bool(active.any()):
                break
            if cache is None:
                logits = model(x, pos, attn)[:, lo:hi]
            elif first_step:
                cache.truncate(0)
                commit = lo if params.cache == "prefix" else total
                logits = model(x, pos, attn, cache=cache, commit=commit)[:, lo:hi]
            elif params.cache == "prefix":
                logits = model(x[:, lo:], pos[:, lo:], attn[:, lo:], cache=cache)[:, : hi - lo]
            else:
                logits = model(x[:, lo:hi], pos[:, lo:hi], attn[:, lo:hi], cache=cache, start=lo)
            first_step = False
            forwards += 1
            nfe += active.long()
            tokens, conf = choose_tokens(logits, params.temperature, generator)
            take = select(logits, tokens, conf, masked)
            x[:, lo:hi] = torch.where(take, tokens, x[:, lo:hi])
            steps = unmask_step[:, lo - p0: hi - p0]
            unmask_step[:, lo - p0: hi - p0] = torch.where(take, (nfe - 1)[:, None], steps)
            if params.early_stop:
                done = finish_rows(x, p0, eos, cfg.mask_id) & ~finished
                if bool(done.any()):
                    rest = (x[:, p0:] == cfg.mask_id) & done[:, None]
                    x[:, p0:] = torch.where(rest, eos[0], x[:, p0:])
                    unmask_step = torch.where(rest, (nfe - 1)[:, None], unmask_step)
                    finished |= done
    return finish(name, prompts, x[:, p0:], nfe, unmask_step, cfg.eos_ids, t0, batch_forwards=forwards)
