"""GSM8K, MATH-500, HumanEval and MBPP through the peers' protocols on the tiny models: the whole path runs.

The tiny models know only the synthetic task and have a 128-token context, so prompts are cut on
the left (as lm-eval does) and the scores are near zero; what is checked is that every protocol
builds its prompt, decodes, post-processes (stops, sanitize) and is judged (math-verify, sandbox).
"""

from __future__ import annotations

import pytest
import torch

from d3core.eval.harness import evaluate_task
from d3core.eval.protocols import get_protocol
from d3core.eval.sandbox import STATUSES
from d3core.eval.tasks import get_task
from d3core.samplers import get_sampler

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

N = 2
GEN = 16


@pytest.fixture(scope="module")
def ar_model():
    from d3core.models.shipped import load_tiny_ar

    return load_tiny_ar()


@pytest.mark.parametrize("task_name", ["gsm8k", "math500", "humaneval", "mbpp"])
@pytest.mark.parametrize("system", ["teacher/d3llm", "AR/ar"])
def test_protocol_smoke(task_name, system, teacher, ar_model, tok):
    model, sampler = (teacher, "d3llm") if system.startswith("teacher") else (ar_model, "ar")
    family = "llada" if sampler == "d3llm" else "ar-llada"
    task, protocol = get_task(task_name), get_protocol(family, task_name)
    spec = get_sampler(sampler)
    kwargs = dict(gen_length=GEN, threshold=0.5, block_length=GEN) if sampler == "d3llm" else dict(gen_length=GEN)
    examples = task.examples(N)
    report = evaluate_task(model, tok, task, spec, spec.params_cls(**kwargs), examples, batch_size=N,
                           generator=torch.Generator().manual_seed(0), truncate_prompts=True)
    assert report.protocol["family"] == family and report.n == N and 0.0 <= report.accuracy <= 1.0
    assert report.total_nfe > 0 and len(report.samples) == N
    for record, example in zip(report.samples, examples):
        assert record.id == example.id and record.prompt == task.prompt(tok, example, protocol)
        assert record.nfe > 0 and len(record.tokens) <= GEN and len(record.unmask_steps) == len(record.tokens)
        if task.code:
            assert record.verdict["status"] in STATUSES and isinstance(record.answer, str)
        else:
            assert record.verdict is None
    if task_name == "math500" and family == "llada":  # 4 Minerva shots never fit in 128 tokens
        assert report.truncated_prompts == N and all(r.prompt_truncated for r in report.samples)


@pytest.fixture(scope="module")
def tiny_dream(tmp_path_factory):
    """A random tiny Dream in the official layout (its tokenizer is checkpoint code: trust_remote_code)."""
    from official_layout import write_dream_checkpoint

    from d3core.models.checkpoint import load_pretrained
    from d3core.models.tokenizer import load_tokenizer

    path = write_dream_checkpoint(tmp_path_factory.mktemp("dream") / "dream")
    return load_pretrained(str(path)), load_tokenizer(str(path), trust_remote_code=True)


@pytest.mark.parametrize("task_name", ["gsm8k", "math500", "humaneval", "mbpp"])
def test_dream_protocol_smoke(task_name, tiny_dream):
    """A Dream-architecture model gets the dream protocols (chat turn, assistant prefix) from its family."""
    model, tokenizer = tiny_dream
    task = get_task(task_name)
    spec = get_sampler("d3llm")
    examples = task.examples(N)
    report = evaluate_task(model, tokenizer, task, spec, spec.params_cls(gen_length=GEN, block_length=GEN,
                                                                          threshold=0.5), examples,
                           batch_size=N, generator=torch.Generator().manual_seed(0), truncate_prompts=True)
    protocol = get_protocol("dream", task_name)
    assert report.protocol == protocol.describe() and report.n == N
    for record, example in zip(report.samples, examples):
        assert record.prompt == task.prompt(tokenizer, example, protocol)
        assert record.prompt.endswith(task.assistant_prefix(example, protocol) or "<|im_start|>assistant\n")
        assert (record.verdict is not None) == task.code
