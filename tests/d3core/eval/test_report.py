"""The report builder: AUP per system with task-level y_max, operating points, markdown, plot."""

from __future__ import annotations

import pytest

from d3core.eval.aup import aup
from d3core.eval.plots import plot_report
from d3core.eval.report import build_report, to_markdown


def cell(model, sampler, threshold, acc, tpf, task="synthetic", tps=100.0):
    return {"model": model, "sampler": sampler, "threshold": threshold, "task": task, "accuracy": acc, "tpf": tpf,
            "tokens_per_second": tps, "mean_nfe": 48.0 / tpf}


CELLS = [
    cell("AR", "ar", None, 0.95, 0.96),
    cell("teacher", "vanilla", None, 0.70, 0.51),
    cell("teacher", "d3llm", 0.1, 0.78, 1.6),
    cell("teacher", "d3llm", 0.5, 0.74, 2.4),
    cell("teacher", "d3llm", 1.0, 0.60, 4.4),  # more than 5 points below 78: filtered
    cell("student", "d3llm", 0.1, 0.80, 2.0),
    cell("student", "d3llm", 0.5, 0.79, 3.5),
    cell("AR", "ar", None, 0.50, 0.97, task="gsm8k"),
    cell("teacher", "d3llm", 0.5, 0.20, 3.0, task="gsm8k"),
]


def test_aup_uses_task_y_max_over_all_systems():
    rep = build_report(CELLS)
    assert rep["y_max"] == {"synthetic": 95.0, "gsm8k": 50.0}
    a = rep["aup"]["synthetic"]
    assert a["AR/ar"] == pytest.approx(95.0)  # single point at TPF 1
    assert a["teacher/vanilla"] == pytest.approx(70.0)
    assert a["teacher/d3llm"] == pytest.approx(aup([(1.6, 78.0), (2.4, 74.0)], 95.0))
    assert a["student/d3llm"] == pytest.approx(aup([(2.0, 80.0), (3.5, 79.0)], 95.0))
    assert a["student/d3llm"] > a["teacher/d3llm"]
    assert rep["aup"]["gsm8k"]["teacher/d3llm"] == pytest.approx(3.0 * 20.0)


def test_anchor_vanilla_prepends_the_vanilla_point():
    rep = build_report(CELLS, anchor_vanilla=True)
    assert rep["points"]["synthetic"]["teacher/d3llm"][0] == [1.0, 70.0]
    assert rep["aup"]["synthetic"]["teacher/d3llm"] == pytest.approx(
        aup([(1.0, 70.0), (1.6, 78.0), (2.4, 74.0), (4.4, 60.0)], 95.0))


def test_operating_point_is_the_fastest_kept_point():
    op = build_report(CELLS)["operating_point"]["synthetic"]
    assert op["teacher/d3llm"]["threshold"] == 0.5 and op["teacher/d3llm"]["accuracy"] == pytest.approx(74.0)
    assert op["student/d3llm"]["tpf"] == pytest.approx(3.5)
    assert op["AR/ar"]["tpf"] == pytest.approx(0.96)  # tables show the measured TPF


def test_markdown_lists_every_system_and_point():
    md = to_markdown(build_report(CELLS, meta={"preset": "tiny"}))
    for system in ("AR/ar", "teacher/vanilla", "teacher/d3llm", "student/d3llm"):
        assert f"| {system} |" in md
    assert "| method | synthetic | gsm8k | avg AUP |" in md
    assert md.count("| synthetic | teacher/d3llm |") == 3


def test_plot_is_a_png():
    png = plot_report(build_report(CELLS))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_zero_accuracy_task_and_empty_input():
    rep = build_report([cell("teacher", "d3llm", 0.5, 0.0, 2.0, task="mbpp")])
    assert rep["aup"]["mbpp"]["teacher/d3llm"] == 0.0
    with pytest.raises(ValueError, match="no cells"):
        build_report([])


def _code_records(confinements):
    """Per-sample records of a code cell whose verdicts name ``confinements`` (None: a verdict without one)."""
    return [{"id": str(i), "correct": True, "generated_tokens": 10, "nfe": 5,
             "verdict": {"status": "passed", "confinement": c} if c is not None else {"status": "passed"}}
            for i, c in enumerate(confinements)]


def test_code_cells_name_their_confinement_and_weaker_ones_are_flagged():
    cells = [cell("teacher", "d3llm", 0.5, 0.5, 2.0, task="humaneval"),
             cell("teacher", "d3llm", 0.1, 0.6, 1.5, task="humaneval"),
             cell("teacher", "vanilla", None, 0.6, 1.0, task="humaneval"),
             cell("teacher", "d3llm", 0.5, 0.7, 2.0)]  # synthetic: no code, no verdicts
    full = "bwrap-root+cgroup+seccomp"
    samples = [_code_records([full, full]), _code_records([full, "bwrap-user+cgroup"]), _code_records([None, None]),
               [{"id": "0", "correct": True, "generated_tokens": 10, "nfe": 5, "verdict": None}]]
    rep = build_report(cells, samples=samples)
    assert [(e["threshold"], e["confinements"], e["seccomp"]) for e in rep["confinement"]] == [
        (0.5, [full], True), (0.1, ["bwrap-root+cgroup+seccomp", "bwrap-user+cgroup"], False),
        (None, ["unrecorded"], False)]
    assert [(e["system"], e["threshold"]) for e in rep["weak_confinement"]] == [("teacher/d3llm", 0.1),
                                                                               ("teacher/vanilla", None)]
    md = to_markdown(rep)
    assert "**Weaker sandbox:** 2 code cell(s) were judged without the seccomp filter" in md
    assert "humaneval teacher/d3llm at 0.1 (bwrap-root+cgroup+seccomp, bwrap-user+cgroup)" in md
    assert "| humaneval | teacher/d3llm | 0.5 | bwrap-root+cgroup+seccomp | yes |" in md
    assert "| humaneval | teacher/vanilla | - | unrecorded | **no** |" in md
    quiet = to_markdown(build_report(cells[:1], samples=samples[:1]))
    assert "Weaker sandbox" not in quiet and "## Sandbox confinement" in quiet
    assert build_report(CELLS)["confinement"] == [] and "Sandbox confinement" not in to_markdown(build_report(CELLS))


def test_cells_and_operating_points_carry_token_forwards_per_token():
    cells = [dict(c, forwards_per_token=7.5 if c["sampler"] == "d3llm" else None) for c in CELLS]
    rep = build_report(cells)
    assert rep["operating_point"]["synthetic"]["student/d3llm"]["forwards_per_token"] == 7.5
    assert rep["operating_point"]["synthetic"]["AR/ar"]["forwards_per_token"] is None
    md = to_markdown(rep)
    assert "token-forwards / token" in md and "| 7.5 |" in md
