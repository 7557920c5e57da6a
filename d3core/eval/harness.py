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
from d3core.eval.protocols import Protocol, resolve_protocol
from d3core.eval.records import SampleRecord, sample_records
from d3core.eval.sandbox import SandboxLimits
from d3core.eval.tasks import Task, get_task
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
    protocol: dict | None = None  # the Protocol the prompts followed (family, few-shot, chat, prefix, sanitize)
    forwards_per_token: float = 0.0  # token-forwards per committed token (SequenceResult.forwards_per_token)
    samples: list[SampleRecord] | None = None  # one record per example (prompt, output, answer, verdict, NFE)
    truncated_prompts: int = 0  # prompts cut on the left to fit the model's context (``truncate_prompts``)

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("outputs", "correct", "samples")}


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
    correct, generated, nfe, computed, slots = 0, 0, 0, 0, 0
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
            computed += seq.tokens_computed
            slots += len(seq.tokens)
    wall = time.perf_counter() - t0
    n = max(len(problems), 1)
    return EvalReport(sampler, len(problems), correct / n, generated / max(nfe, 1), generated / max(wall, 1e-9),
                      nfe / n, wall, outputs, forwards_per_token=computed / max(slots, 1))


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
    protocol: Protocol | None = None,
    truncate_prompts: bool = False,
) -> EvalReport:
    """Decode ``examples`` of ``task`` with ``sampler`` (a registry name or a :class:`Sampler`) and score them.

    Prompts follow ``protocol``, or the one :func:`~d3core.eval.protocols.resolve_protocol` gives for
    ``style`` and the model's family. Responses are cut at the protocol's stop strings before
    scoring; as d3LLM counts them, the generated tokens of a cut response are the re-tokenised kept
    text (otherwise the tokens up to EOS). TPF = generated tokens / forwards over the whole set;
    tokens/s divides the same tokens by the decoding time (scoring excluded). ``truncate_prompts``
    keeps the last tokens of a prompt too long for the model's context (as lm-eval does), counted in
    the report and marked in each sample record; otherwise such a prompt is an error.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if not examples:
        raise ValueError("examples is empty: pass at least one example to evaluate")
    task = get_task(task) if isinstance(task, str) else task
    protocol = task.protocol(protocol) if protocol is not None else \
        resolve_protocol(style, model_family(model), task.name)
    spec = sampler if isinstance(sampler, Sampler) else get_sampler(sampler)
    sampler = spec.name
    extra = {"verifier": verifier} if spec.needs_verifier else {}
    budget = prompt_budget(model, params) if truncate_prompts else None
    responses: list[str] = []
    sequences = []
    generated_per: list[int] = []
    truncated: list[bool] = []
    decode_time = 0.0
    starts = range(0, len(examples), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=f"{task.name}/{sampler}", unit="batch")
    for start in starts:
        chunk = examples[start: start + batch_size]
        prompts = [task.encode(tokenizer, e, protocol) for e in chunk]
        if budget is not None:
            truncated += [len(p) > budget for p in prompts]
            prompts = [p[-budget:] for p in prompts]
        result = spec.generate(model, prompts, params, generator=generator, **extra)
        decode_time += result.wall_time
        for seq in result.sequences:
            text, was_cut = task.cut(tokenizer.decode(seq.response_ids, skip_special_tokens=True), protocol)
            responses.append(text)
            sequences.append(seq)
            generated_per.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]) if was_cut
                                 else seq.num_generated)
    judgement = task.judge(responses, examples, protocol, limits, code_workers)
    correct = judgement.metrics[task.metric_names[0]]
    n = len(examples)
    generated, nfe = sum(generated_per), sum(s.nfe for s in sequences)
    if any(truncated):
        logger.warning("%s: %d of %d prompts were cut on the left to fit the model's context", task.name,
                       sum(truncated), n)
    logger.info("%s/%s: accuracy %.4f, TPF %.3f over %d examples", task.name, sampler, sum(correct) / n,
                generated / max(nfe, 1), n)
    samples = sample_records(task, tokenizer, examples, protocol, responses, sequences, generated_per, judgement,
                             truncated or None)
    return EvalReport(sampler, n, sum(correct) / n, generated / max(nfe, 1), generated / max(decode_time, 1e-9),
                      nfe / n, decode_time, responses, task=task.name, correct=list(correct),
                      generated_tokens=generated, total_nfe=nfe,
                      metrics={name: sum(v) / n for name, v in judgement.metrics.items()},
                      protocol=protocol.describe(), samples=samples, truncated_prompts=sum(truncated),
                      forwards_per_token=sum(s.tokens_computed for s in sequences) /
                      max(sum(len(s.tokens) for s in sequences), 1))


def prompt_budget(model, params) -> int:
    """Prompt tokens that fit beside ``params.gen_length`` in the model's context."""
    cfg = model.config
    context = getattr(cfg, "max_seq_len", None) or getattr(cfg, "max_position_embeddings", None)
    if not context:
        raise ValueError(f"{type(model).__name__} names no context length (max_seq_len / "
                         "max_position_embeddings): truncate_prompts needs one")
    budget = int(context) - int(params.gen_length)
    if budget < 1:
        raise ValueError(f"gen_length={params.gen_length} leaves no room for a prompt in the model's context "
                         f"{context}: lower gen_length")
    return budget
