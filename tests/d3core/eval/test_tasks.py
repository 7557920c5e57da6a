"""Task prompts, styles, cutting, shipped data, and the generalised harness on the tiny model."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from d3core.eval import benchmarks, synthetic
from d3core.eval.harness import evaluate_synthetic, evaluate_task
from d3core.eval.tasks import TASK_NAMES, get_task, resolve_style
from d3core.samplers import get_sampler

SHARED = Path(__file__).resolve().parents[4] / "shared" / "data"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.skipif(not SHARED.exists(), reason="the project's shared/data is not beside this checkout")
@pytest.mark.parametrize("name,published", [("gsm8k", "gsm8k/test.jsonl"), ("math500", "math500/test.jsonl"),
                                            ("humaneval", "humaneval/HumanEval.jsonl.gz")])
def test_shipped_sets_equal_the_published_files(name, published):
    path = SHARED / published
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        assert benchmarks.load_raw(name) == [json.loads(line) for line in f if line.strip()]


@pytest.mark.skipif(not SHARED.exists(), reason="the project's shared/data is not beside this checkout")
def test_shipped_mbpp_is_the_published_prompt_and_test_splits():
    with open(SHARED / "mbpp" / "mbpp.jsonl", encoding="utf-8") as f:
        published = [json.loads(line) for line in f if line.strip()]
    assert benchmarks.load_raw("mbpp") == [r for r in published if r["task_id"] <= 510]


def test_split_sizes():
    assert len(get_task("gsm8k").examples()) == 1319
    assert len(get_task("long_gsm8k").examples()) == 1314
    assert len(get_task("math500").examples()) == 500
    assert len(get_task("humaneval").examples()) == 164
    assert len(get_task("mbpp").examples()) == 500
    assert len(get_task("synthetic").examples(7)) == 7


def test_prompt_formats():
    e = get_task("gsm8k").examples(1)[0]
    assert get_task("gsm8k").prompt_text(e, "raw") == f"Q: {e.question}\nA: Let's think step by step."
    long = get_task("long_gsm8k")
    text = long.prompt_text(long.examples(1)[0], "raw")
    assert text.count("Question: ") == 6 and text.count("#### ") == 5 and text.endswith("\nAnswer:")
    shot_ids = {s.id for s in long.fewshot}
    assert not shot_ids & {x.id for x in long.examples()}  # shots are never evaluated
    m = get_task("math500")
    me = m.examples(1)[0]
    assert m.prompt_text(me, "raw") == f"Problem:\n{me.question}\n\nSolution:"
    assert "\\boxed{}" in m.prompt_text(me, "chat")
    mb = get_task("mbpp")
    mtext = mb.prompt_text(mb.examples(1)[0], "chat")
    assert mtext.count("[BEGIN]") == 4 and mtext.count("[DONE]") == 3 and mtext.endswith("[BEGIN]\n")
    he = get_task("humaneval")
    he_e = he.examples(1)[0]
    assert he.prompt_text(he_e, "raw") == he_e.meta["prompt"]
    assert "```python\n" + he_e.meta["prompt"] in he.prompt_text(he_e, "chat")


def test_styles_follow_the_d3llm_harness():
    assert resolve_style("auto", "llada", "gsm8k") == "raw"
    assert resolve_style("auto", "llada", "math500") == "raw"
    assert resolve_style("auto", "llada", "humaneval") == "chat"
    assert resolve_style("auto", "dream", "gsm8k") == "chat"
    assert resolve_style("auto", "llada", "synthetic") == "chat"
    assert resolve_style("raw", "dream", "gsm8k") == "raw"
    with pytest.raises(ValueError, match="prompt style"):
        resolve_style("fancy", "llada", "gsm8k")
    with pytest.raises(ValueError, match="unknown task"):
        get_task("gsm9k")
    assert set(TASK_NAMES) == {"synthetic", "gsm8k", "long_gsm8k", "math500", "humaneval", "mbpp"}


def test_cut_at_stop_strings():
    assert get_task("gsm8k").cut("The answer is 4.\n\nQ: next question") == ("The answer is 4.\n\n", True)
    assert get_task("mbpp").cut("def f():\n    pass\n[DONE] junk") == ("def f():\n    pass\n", True)
    assert get_task("synthetic").cut("so the answer is 9") == ("so the answer is 9", False)


def test_encode_raw_and_chat(tok):
    task = get_task("synthetic")
    e = task.examples(1)[0]
    chat, raw = task.encode(tok, e, "chat"), task.encode(tok, e, "raw")
    assert len(chat) > len(raw) and chat != raw


def test_evaluate_task_matches_evaluate_synthetic(teacher, tok):
    spec = get_sampler("d3llm")
    params = spec.params_cls(threshold=0.5)
    problems = synthetic.generate("test", 12, seed=0)
    old = evaluate_synthetic(teacher, tok, "d3llm", params, problems, batch_size=6)
    new = evaluate_task(teacher, tok, "synthetic", "d3llm", params, get_task("synthetic").examples(12),
                        batch_size=6)
    assert new.outputs == old.outputs
    assert new.accuracy == old.accuracy and new.tpf == pytest.approx(old.tpf)
    assert new.correct is not None and sum(new.correct) == round(new.accuracy * 12)
    assert new.total_nfe == round(new.mean_nfe * 12) and new.generated_tokens > 0


def test_evaluate_task_runs_a_real_benchmark_on_the_tiny_model(teacher, tok):
    task = get_task("gsm8k")
    short = sorted(task.examples(), key=lambda e: len(task.encode(tok, e, "chat")))[:3]
    spec = get_sampler("fast_dllm")
    report = evaluate_task(teacher, tok, task, spec, spec.params_cls(gen_length=16, block_length=16, threshold=0.9),
                           short, batch_size=3, style="chat", generator=torch.Generator().manual_seed(0))
    assert report.task == "gsm8k" and report.n == 3 and len(report.outputs) == 3
    assert 0.0 <= report.accuracy <= 1.0 and report.total_nfe > 0
    assert set(report.metrics) == {"strict-match", "flexible-extract"}  # lm-eval's two, reported apart
    assert report.accuracy == report.metrics["flexible-extract"] and "metrics" in report.summary()


def test_raw_humaneval_continuation_is_cut_where_the_function_ends():
    he = get_task("humaneval")
    text = "    return x + 1\n\n\ndef unrelated():\n    pass\n"
    assert he.cut(text, "raw") == ("    return x + 1\n\n", True)
    assert he.cut(text, "chat") == (text, False)
