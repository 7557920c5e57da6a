"""``dparallel``: entropy-threshold decoding within the current block (dParallel's decoder).

Each step commits every masked position of the current block whose predictive entropy is
``<= threshold`` (nats), and always the lowest-entropy one. dParallel reports its numbers
without a cache; the Fast-dLLM prefix and dual caches are available here too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from d3core.samplers.base import GenerationResult, entropy
from d3core.samplers.blockwise import BlockwiseParams, decode, with_best

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DParallelParams(BlockwiseParams):
    threshold: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.threshold >= 0:
            raise ValueError(f"threshold={self.threshold}: an entropy threshold must be >= 0 nats")


def entropy_rule(threshold: float):
    def select(logits, tokens, conf, masked):
        h = entropy(logits)
        return with_best(masked & (h <= threshold), -h, masked)

    return select


def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    params: DParallelParams = DParallelParams(),
    generator: torch.Generator | None = None,
) -> GenerationResult:
    return decode(model, prompts, params, entropy_rule(params.threshold), "dparallel", generator)
