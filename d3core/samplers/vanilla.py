"""``vanilla``: LLaDA's semi-autoregressive low-confidence remasking, the TPF=1 reference.

Generation slots are split into blocks decoded left to right; each block gets
``steps * block_length / gen_length`` steps and each step runs the model on the whole
sequence (no cache) and commits a precomputed number of masked positions of the current
block, those whose chosen token has the highest probability (``low_confidence``) or random
ones (``random``). Positions right of the current block are inputs but are never committed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from d3core.samplers.base import BlockParams, GenerationResult
from d3core.samplers.engine import Decoder, Program, Row
from d3core.samplers.generation import OnStep, run
from d3core.samplers.plan import Cells, RowPlan

REMASKING = ("low_confidence", "random")


@dataclass(frozen=True)
class VanillaParams(BlockParams):
    steps: int | None = None  # default: gen_length, one token per step
    remasking: str = "low_confidence"

    def __post_init__(self) -> None:
        super().__post_init__()
        steps = self.total_steps
        if steps <= 0 or steps % self.num_blocks:
            raise ValueError(
                f"steps={steps} must be a positive multiple of the number of blocks ({self.num_blocks} = "
                f"gen_length {self.gen_length} / block_length {self.block_length})"
            )
        if steps > self.gen_length:
            raise ValueError(f"steps={steps} > gen_length={self.gen_length}: a step must commit at least one token")
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking={self.remasking!r}: must be one of {REMASKING}")

    @property
    def total_steps(self) -> int:
        return self.gen_length if self.steps is None else self.steps


def transfer_schedule(n: int, steps: int) -> list[int]:
    """How many of ``n`` masked positions to commit at each of ``steps`` steps (front-loaded remainder)."""
    base, rem = divmod(n, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


@dataclass
class _State:
    schedule: list[int]
    block: int = 0
    step_in_block: int = 0


class VanillaProgram(Program):
    name = "vanilla"

    def init_row(self, row: Row, d: Decoder) -> None:
        p = row.params
        row.state = _State(transfer_schedule(p.block_length, p.total_steps // p.num_blocks))

    def reads_cache(self, params: VanillaParams) -> bool:
        return False  # every step recomputes the whole sequence

    def wants_uniform(self, params: VanillaParams) -> bool:
        return params.remasking == "random"

    def plan(self, row: Row, d: Decoder) -> RowPlan | None:
        st, p = row.state, row.params
        if st.block == p.num_blocks:
            return None
        lo = row.prompt_len + st.block * p.block_length
        return RowPlan(0, row.length, row.length, [lo],
                       params={"k": st.schedule[st.step_in_block], "random": p.remasking == "random"},
                       temperature=p.temperature)

    def rule(self, cells: Cells) -> torch.Tensor:
        n, ns, seg = cells.cand.shape
        score = cells.conf
        if cells.uniform is not None:
            score = torch.where(cells.row["random"][:, None, None] > 0, cells.uniform.to(score.dtype), score)
        score = torch.where(cells.cand, score, torch.full_like(score, -float("inf"))).view(n, ns * seg)
        top = score.topk(cells.row.max("k"), dim=-1).indices  # the largest k is a host int: no sync
        ranks = torch.arange(top.shape[1], device=top.device)[None]
        take = torch.zeros_like(cells.cand.view(n, ns * seg))
        take.scatter_(1, top, ranks < cells.row["k"][:, None])
        return take.view(n, ns, seg)

    def after(self, row: Row, d: Decoder, committed: np.ndarray) -> None:
        st = row.state
        st.step_in_block += 1
        if st.step_in_block == len(st.schedule):
            st.block, st.step_in_block = st.block + 1, 0


PROGRAM = VanillaProgram()


def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    params: VanillaParams = VanillaParams(),
    generator: torch.Generator | None = None,
    on_step: OnStep | None = None,
    verifier: torch.nn.Module | None = None,
) -> GenerationResult:
    return run(VanillaProgram(), model, prompts, params, generator, on_step)
