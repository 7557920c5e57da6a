"""Run a sampler over an evaluation task and score it (accuracy, TPF, tokens/s, NFE).

:func:`evaluate_task` covers every task in :mod:`d3core.eval.tasks`; :func:`evaluate_synthetic`
is the original synthetic-only entry point, kept as it was.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from d3core.eval import synthetic
from d3core.eval.benchmarks import Example
from d3core.eval.sandbox import SandboxLimits
from d3core.eval.tasks import Task, get_task, resolve_style
from d3core.samplers import Sampler, get_sampler
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
    task: str = "synthetic"
    correct: list[bool] | None = None
    generated_tokens: int = 0
    total_nfe: int = 0
    metrics: dict[str, float] | None = None  # accuracy under each of the task's metrics (GSM8K: lm-eval's two)

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("outputs", "correct")}


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


def model_family(model: torch.nn.Module) -> str:
    """``llada`` / ``dream`` for d3core dLLMs, the HF ``model_type`` (e.g. ``llama``) for AR models."""
    cfg = model.config
    return str(getattr(cfg, "arch", None) or getattr(cfg, "model_type", "") or "").lower()


def evaluate_task(
    model: torch.nn.Module,
    tokenizer,
    task: str | Task,
    sampler: str | Sampler,
    params,
    examples: Sequence[Example],
    batch_size: int = 128,
    generator: torch.Generator | None = None,
    verifier: torch.nn.Module | None = None,
    style: str = "auto",
    limits: SandboxLimits = SandboxLimits(),
    code_workers: int = 2,
    progress: bool = False,
) -> EvalReport:
    """Decode ``examples`` of ``task`` with ``sampler`` (a registry name or a :class:`Sampler`) and score them.

    Responses are cut at the task's stop strings before scoring; as d3LLM counts them, the
    generated tokens of a cut response are the re-tokenised kept text (otherwise the tokens up
    to EOS). TPF = generated tokens / forwards over the whole set; tokens/s divides the same
    tokens by the decoding time (scoring excluded).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if not examples:
        raise ValueError("examples is empty: pass at least one example to evaluate")
    task = get_task(task) if isinstance(task, str) else task
    style = resolve_style(style, model_family(model), task.name)
    spec = sampler if isinstance(sampler, Sampler) else get_sampler(sampler)
    sampler = spec.name
    extra = {"verifier": verifier} if spec.needs_verifier else {}
    responses: list[str] = []
    generated = nfe = 0
    decode_time = 0.0
    starts = range(0, len(examples), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=f"{task.name}/{sampler}", unit="batch")
    for start in starts:
        chunk = examples[start: start + batch_size]
        prompts = [task.encode(tokenizer, e, style) for e in chunk]
        result = spec.generate(model, prompts, params, generator=generator, **extra)
        decode_time += result.wall_time
        for seq in result.sequences:
            text, was_cut = task.cut(tokenizer.decode(seq.response_ids, skip_special_tokens=True), style)
            responses.append(text)
            generated += len(tokenizer(text, add_special_tokens=False)["input_ids"]) if was_cut else seq.num_generated
            nfe += seq.nfe
    per_metric = task.metrics(responses, examples, style, limits, code_workers)
    correct = per_metric[task.metric_names[0]]
    n = len(examples)
    logger.info("%s/%s: accuracy %.4f, TPF %.3f over %d examples", task.name, sampler, sum(correct) / n,
                generated / max(nfe, 1), n)
    return EvalReport(sampler, n, sum(correct) / n, generated / max(nfe, 1), generated / max(decode_time, 1e-9),
                      nfe / n, decode_time, responses, task=task.name, correct=list(correct),
                      generated_tokens=generated, total_nfe=nfe,
                      metrics={name: sum(v) / n for name, v in per_metric.items()})
