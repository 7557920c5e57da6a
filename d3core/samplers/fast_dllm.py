"""``fast_dllm``: Fast-dLLM confidence-aware parallel decoding with prefix or dual KV cache.

Within the current block, commit every masked position whose chosen token has probability
``>= threshold``, and always the single most confident one (the rule Fast-dLLM's loop code
has; its vectorised rewrite lost the guarantee). With ``factor`` set, the factor rule
replaces the threshold: commit the ``n`` most confident positions for the largest ``n``
with ``c_(k) >= 1 - factor / (k + 1)`` for every ``k <= n`` (``k = 1`` always accepted).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from d3core.samplers.base import GenerationResult, check_probability
from d3core.samplers.blockwise import BlockwiseParams, decode, with_best

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FastDLLMParams(BlockwiseParams):
    threshold: float = 0.9
    factor: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_probability("threshold", self.threshold)
        if self.factor is not None and not self.factor > 0:
            raise ValueError(f"factor={self.factor}: must be > 0 (Fast-dLLM uses 1.0), or None for the threshold")


def threshold_rule(threshold: float):
    def select(logits, tokens, conf, masked):
        return with_best(masked & (conf >= threshold), conf, masked)

    return select


def factor_rule(factor: float):
    def select(logits, tokens, conf, masked):
        scores = torch.where(masked, conf, torch.full_like(conf, -1.0))
        ordered, order = scores.sort(-1, descending=True)
        k = torch.arange(1, conf.shape[-1] + 1, device=conf.device, dtype=conf.dtype)
        ok = ordered >= 1 - factor / (k + 1)
        ok[:, 0] = True
        ok &= ordered >= 0  # only masked positions
        n = ok.long().cumprod(-1).sum(-1, keepdim=True)
        ranks = torch.arange(conf.shape[-1], device=conf.device)[None].expand_as(conf)
        take_sorted = ranks < n
        take = torch.zeros_like(masked).scatter(-1, order, take_sorted)
        return take & masked

    return select


def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    params: FastDLLMParams = FastDLLMParams(),
    generator: torch.Generator | None = None,
) -> GenerationResult:
    rule = factor_rule(params.factor) if params.factor is not None else threshold_rule(params.threshold)
    return decode(model, prompts, params, rule, "fast_dllm", generator)
