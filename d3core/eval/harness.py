"""Run a sampler over the synthetic task and score it (accuracy, TPF, tokens/s, NFE)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from d3core.eval import synthetic
from d3core.samplers import get_sampler
from d3core.sft import encode_prompt

logger = logging.getLogger(__name__)


@dataclass
class EvalReport:
    sampler: str
    n: int
    accuracy: float
    tpf: float
    tokens_per_second: float
    mean_nfe: float
    wall_time: float
    outputs: list[str]

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "outputs"}


def evaluate_synthetic(
    model: torch.nn.Module,
    tokenizer,
    sampler: str,
    params,
    problems: Sequence[synthetic.Problem],
    batch_size: int = 128,
    generator: torch.Generator | None = None,
    verifier: torch.nn.Module | None = None,
) -> EvalReport:
    """Decode ``problems`` in batches of ``batch_size`` and score the final numbers."""
    spec = get_sampler(sampler)
    extra = {"verifier": verifier} if spec.needs_verifier else {}
    correct, generated, nfe = 0, 0, 0
    outputs: list[str] = []
    t0 = time.perf_counter()
    for start in range(0, len(problems), batch_size):
        chunk = problems[start: start + batch_size]
        prompts = [encode_prompt(tokenizer, p.question) for p in chunk]
        result = spec.generate(model, prompts, params, generator=generator, **extra)
        for p, seq in zip(chunk, result.sequences):
            text = tokenizer.decode(seq.response_ids, skip_special_tokens=True)
            outputs.append(text)
            correct += synthetic.score(text, p.target)
            generated += seq.num_generated
            nfe += seq.nfe
    wall = time.perf_counter() - t0
    n = max(len(problems), 1)
    return EvalReport(sampler, len(problems), correct / n, generated / max(nfe, 1), generated / max(wall, 1e-9),
                      nfe / n, wall, outputs)
