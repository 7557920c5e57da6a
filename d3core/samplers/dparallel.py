"""``dparallel``: entropy-threshold decoding within the current block (dParallel's decoder).

Each step commits every masked position of the current block whose predictive entropy is
``<= threshold`` (nats), and always the lowest-entropy one. dParallel reports its numbers
without a cache; the Fast-dLLM prefix and dual caches are available here too. The threshold
is a per-row parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from d3core.samplers.base import GenerationResult
from d3core.samplers.blockwise import BlockwiseParams, BlockwiseProgram, with_best
from d3core.samplers.generation import OnStep, run


@dataclass(frozen=True)
class DParallelParams(BlockwiseParams):
    threshold: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.threshold >= 0:
            raise ValueError(f"threshold={self.threshold}: an entropy threshold must be >= 0 nats")


class DParallelProgram(BlockwiseProgram):
    name = "dparallel"
    needs_entropy = True

    def row_params(self, params: DParallelParams) -> dict[str, bool | int | float]:
        return {"threshold": params.threshold}

    def select(self, conf, ent, masked, row):
        return with_best(masked & (ent <= row["threshold"][:, None].to(ent.dtype)), -ent, masked)


def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    params: DParallelParams = DParallelParams(),
    generator: torch.Generator | None = None,
    on_step: OnStep | None = None,
    verifier: torch.nn.Module | None = None,
) -> GenerationResult:
    return run(DParallelProgram(), model, prompts, params, generator, on_step)
