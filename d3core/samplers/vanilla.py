"""``vanilla``: LLaDA's semi-autoregressive low-confidence remasking, the TPF=1 reference.

Generation slots are split into blocks decoded left to right; each block gets
``steps * block_length / gen_length`` steps and each step runs the model on the whole
sequence (no cache) and commits a precomputed number of masked positions of the current
block, those whose chosen token has the highest probability (``low_confidence``) or random
ones (``random``). Positions right of the current block are inputs but are never committed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from d3core.samplers.base import (
    GenerationResult,
    begin,
    check_blocks,
    choose_tokens,
    finish,
)

logger = logging.getLogger(__name__)

REMASKING = ("low_confidence", "random")


@dataclass(frozen=True)
class VanillaParams:
    gen_length: int = 48
    block_length: int = 16
    steps: int | None = None  # default: gen_length, one token per step
    temperature: float = 0.0
    remasking: str = "low_confidence"

    def __post_init__(self) -> None:
        check_blocks(self.gen_length, self.block_length)
        steps = self.total_steps
        blocks = self.gen_length // self.block_length
        if steps <= 0 or steps % blocks:
            raise ValueError(
                f"steps={steps} must be a positive multiple of the number of blocks ({blocks} = "
                f"gen_length {self.gen_length} / block_length {self.block_length})"
            )
        if steps > self.gen_length:
            raise ValueError(f"steps={steps} > gen_length={self.gen_length}: a step must commit at least one token")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 is argmax)")
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking={self.remasking!r}: must be one of {REMASKING}")

    @property
    def total_steps(self) -> int:
        return self.gen_length if self.steps is None else self.steps


def transfer_schedule(n: int, steps: int) -> list[int]:
    """How many of ``n`` masked positions to commit at each of ``steps`` steps (front-loaded remainder)."""
    base, rem = divmod(n, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    params: VanillaParams = VanillaParams(),
    generator: torch.Generator | None = None,
) -> GenerationResult:
    cfg = model.config
    batch, t0 = begin(model, prompts, params.gen_length)
    device = batch.x.device
    x, p0 = batch.x, batch.prompt_len
    b = x.shape[0]
    unmask_step = torch.full((b, params.gen_length), -1, dtype=torch.long, device=device)
    blocks = params.gen_length // params.block_length
    steps_per_block = params.total_steps // blocks
    schedule = transfer_schedule(params.block_length, steps_per_block)
    step = 0
    for blk in range(blocks):
        lo, hi = p0 + blk * params.block_length, p0 + (blk + 1) * params.block_length
        for k in schedule:
            logits = model(x, batch.positions, batch.attention_mask)
            tokens, conf = choose_tokens(logits[:, lo:hi], params.temperature, generator)
            if params.remasking == "random":
                conf = torch.rand(conf.shape, device=device, generator=generator)
            masked = x[:, lo:hi] == cfg.mask_id
            conf = torch.where(masked, conf, torch.full_like(conf, -float("inf")))
            pick = conf.topk(k, dim=-1).indices
            rows = torch.arange(b, device=device)[:, None]
            x[rows, lo + pick] = tokens[rows, pick]
            unmask_step[rows, lo - p0 + pick] = step
            step += 1
    return finish("vanilla", prompts, x[:, p0:], [step] * b, unmask_step, cfg.eos_ids, t0)
