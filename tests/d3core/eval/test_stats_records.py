"""Bootstrap intervals, AUP noise, per-sample records from the harness, provenance, and the report's noise columns."""

from __future__ import annotations

import json

import pytest
import torch

from d3core.eval.harness import evaluate_task
from d3core.eval.records import from_jsonl, git_state, run_metadata, to_jsonl
from d3core.eval.report import build_report, to_markdown
from d3core.eval.stats import PointSamples, aup_noise, bootstrap_ci
from d3core.eval.tasks import get_task
from d3core.samplers import get_sampler

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_bootstrap_ci_brackets_the_mean_and_is_seeded():
    assert bootstrap_ci([True] * 20) == (1.0, 1.0)
    half = [True, False] * 50
    lo, hi = bootstrap_ci(half)
    assert lo < 0.5 < hi and hi - lo < 0.25
    assert bootstrap_ci(half, seed=3) == bootstrap_ci(half, seed=3)
    narrow = bootstrap_ci([True, False] * 500)
    assert narrow[1] - narrow[0] < hi - lo  # more examples, tighter interval
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(half, level=1.5)


def _pts(correct, tpf_tokens=10, nfe=5, unit=False):
    n = len(correct)
    return PointSamples.of(correct, [tpf_tokens] * n, [nfe] * n, unit_tpf=unit)


def test_aup_noise_tells_identical_systems_from_different_ones():
    mixed = [True, False, True, True, False, True, False, True] * 5
    noise = aup_noise({"a": [_pts(mixed)], "twin": [_pts(mixed)], "bad": [_pts([False] * 40)],
                       "ar": [_pts([True] * 40, unit=True)]})
    assert ("a", "twin") in noise.within_noise and noise.difference_ci[("a", "twin")] == (0.0, 0.0)
    assert ("a", "bad") not in noise.within_noise and noise.difference_ci[("a", "bad")][0] > 0
    assert noise.ci["bad"] == (0.0, 0.0) and noise.ci["ar"] == (100.0, 100.0)
    lo, hi = noise.ci["a"]
    assert lo < 2.0 * 62.5 < hi  # the point AUP (TPF 2, 62.5%) lies inside its interval
    with pytest.raises(ValueError, match="same examples"):
        aup_noise({"a": [_pts(mixed)], "b": [_pts(mixed[:10])]})


@pytest.fixture(scope="module")
def synthetic_report(teacher, tok):
    spec = get_sampler("d3llm")
    task = get_task("synthetic")
    return evaluate_task(teacher, tok, task, spec, spec.params_cls(threshold=0.5), task.examples(10), batch_size=5,
                         generator=torch.Generator().manual_seed(0))


def test_harness_returns_one_record_per_example(synthetic_report, tok):
    rep = synthetic_report
    assert [r.id for r in rep.samples] == [e.id for e in get_task("synthetic").examples(10)]
    assert sum(r.correct for r in rep.samples) == sum(rep.correct)
    assert sum(r.nfe for r in rep.samples) == rep.total_nfe
    assert sum(r.generated_tokens for r in rep.samples) == rep.generated_tokens
    for r, out in zip(rep.samples, rep.outputs):
        assert r.output == out and r.prompt.startswith(tok.bos_token) and r.verdict is None
        assert len(r.unmask_steps) == len(r.tokens) and all(s >= 0 for s in r.unmask_steps)
        assert r.answer == (None if r.answer is None else str(int(r.answer)))
        assert r.correct == (r.answer == r.target)
    rows = from_jsonl(to_jsonl(rep.samples))
    assert rows[0]["id"] == rep.samples[0].id and json.loads(rep.samples[0].to_json()) == rows[0]
    assert rep.protocol["family"] == "d3ray" and rep.summary().get("samples") is None


def test_report_from_records_has_intervals_and_noise(synthetic_report):
    rep = synthetic_report
    rows = [json.loads(r.to_json()) for r in rep.samples]
    base = {"task": "synthetic", "sampler": "d3llm", "threshold": 0.5, "accuracy": rep.accuracy, "tpf": rep.tpf,
            "tokens_per_second": 1.0, "mean_nfe": rep.mean_nfe, "accuracy_ci": list(bootstrap_ci(rep.correct))}
    cells = [{**base, "model": "teacher"}, {**base, "model": "copy"}]
    report = build_report(cells, samples=[rows, rows], bootstrap_iters=200)
    assert report["within_noise"]["synthetic"] == [["teacher/d3llm", "copy/d3llm"]]
    lo, hi = report["aup_ci"]["synthetic"]["teacher/d3llm"]
    assert lo <= report["aup"]["synthetic"]["teacher/d3llm"] <= hi
    md = to_markdown(report)
    assert "| teacher/d3llm | 0.5 |" in md and "| copy/d3llm |" in md and "paired-bootstrap" in md
    without = build_report(cells)  # no records: no intervals, and the table says so
    assert without["aup_ci"] == {} and "| n/a |" in to_markdown(without)


def test_provenance_names_code_libraries_hardware_and_seeds():
    meta = run_metadata({"seed": 7})
    assert meta["d3ray"] and meta["seeds"] == {"seed": 7} and meta["python"]
    assert meta["libraries"]["torch"].startswith("2.13") and "transformers" in meta["libraries"]
    assert meta["hardware"]["cores"] >= 1 and meta["hardware"]["cpu"]
    state = git_state()
    assert state["sha"] is None or len(state["sha"]) == 40
