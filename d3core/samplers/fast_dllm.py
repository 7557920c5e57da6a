"""``fast_dllm``: Fast-dLLM confidence-aware parallel decoding with prefix or dual KV cache.

Within the current block, commit every masked position whose chosen token has probability
``>= threshold``, and always the single most confident one (the rule Fast-dLLM's loop code
has; its vectorised rewrite lost the guarantee). With ``factor`` set, the factor rule
replaces the threshold: commit the ``n`` most confident positions for the largest ``n``
with ``c_(k) >= 1 - factor / (k + 1)`` for every ``k <= n`` (``k = 1`` always accepted).
The threshold (or factor) is a per-row parameter: rows with different values share a step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from d3core.samplers.base import GenerationResult, check_probability
from d3core.samplers.blockwise import BlockwiseParams, BlockwiseProgram, with_best
from d3core.samplers.generation import OnStep, run


@dataclass(frozen=True)
class FastDLLMParams(BlockwiseParams):
    threshold: float = 0.9
    factor: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_probability("threshold", self.threshold)
        if self.factor is not None and not self.factor > 0:
            raise ValueError(f"factor={self.factor}: must be > 0 (Fast-dLLM uses 1.0), or None for the threshold")


def threshold_select(conf: torch.Tensor, masked: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return with_best(masked & (conf >= threshold[:, None]), conf, masked)


def factor_select(conf: torch.Tensor, masked: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    scores = torch.where(masked, conf, torch.full_like(conf, -1.0))
    ordered, order = scores.sort(-1, descending=True)
    k = torch.arange(1, conf.shape[-1] + 1, device=conf.device, dtype=conf.dtype)
    ok = ordered >= 1 - factor[:, None].to(conf.dtype) / (k + 1)
    ok[:, 0] = True
    ok &= ordered >= 0  # only masked positions
    n = ok.long().cumprod(-1).sum(-1, keepdim=True)
    ranks = torch.arange(conf.shape[-1], device=conf.device)[None].expand_as(conf)
    take = torch.zeros_like(masked).scatter(-1, order, ranks < n)
    return take & masked


class FastDLLMProgram(BlockwiseProgram):
    name = "fast_dllm"

    def row_params(self, params: FastDLLMParams) -> dict[str, bool | int | float]:
        factor = params.factor is not None
        return {"factor_rule": factor, "threshold": params.threshold, "factor": params.factor if factor else 0.0}

    def select(self, conf, ent, masked, row):
        threshold, factor = row["threshold"].to(conf.dtype), row["factor"]
        if not row.any("factor_rule"):  # the host knows which rules this step's rows use
            return threshold_select(conf, masked, threshold)
        if row.all("factor_rule"):
            return factor_select(conf, masked, factor)
        return torch.where((row["factor_rule"] > 0)[:, None], factor_select(conf, masked, factor),
                           threshold_select(conf, masked, threshold))


def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    params: FastDLLMParams = FastDLLMParams(),
    generator: torch.Generator | None = None,
    on_step: OnStep | None = None,
    verifier: torch.nn.Module | None = None,
) -> GenerationResult:
    return run(FastDLLMProgram(), model, prompts, params, generator, on_step)
