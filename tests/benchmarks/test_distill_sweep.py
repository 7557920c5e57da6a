"""benchmarks/distill_sweep.py: grid parsing and validation (the sweep itself is a benchmark, not a test)."""

from __future__ import annotations

import pytest

from benchmark_module import load_benchmark

sweep = load_benchmark("distill_sweep")


def test_grid_is_the_product_in_order():
    points = sweep.parse_grid("prompts=800,1600;ew=4,8")
    assert [(p.prompts, p.ew) for p in points] == [(800, 4.0), (800, 8.0), (1600, 4.0), (1600, 8.0)]
    assert all(p.steps == sweep.Point().steps for p in points)  # unswept keys keep their defaults


def test_grids_joined_by_bar_run_in_turn_without_repeats():
    points = sweep.parse_grid("ew=4,8|ew=8;seed=1|ew=4")
    assert [(p.ew, p.seed) for p in points] == [(4.0, 0), (8.0, 0), (8.0, 1)]
    assert len({p.name for p in points}) == 3


@pytest.mark.parametrize("spec,match", [
    ("colour=red", "KEY=V1,V2"),
    ("ew", "KEY=V1,V2"),
    ("masking=diagonal", "masking"),
    ("windows=16-x", "windows"),
    ("steps=0", "steps"),
])
def test_bad_grid_names_the_problem(spec, match):
    with pytest.raises(ValueError, match=match):
        sweep.parse_grid(spec)


def test_needs_trajectories_or_students():
    with pytest.raises(SystemExit):
        sweep.main(["--out", "/dev/null"])  # neither --trajectories nor --students


@pytest.mark.parametrize("argv", [["--students", "a=b", "--n-eval", "0"], ["--students", "a=b", "--thresholds", "x"]])
def test_bad_flags_are_refused_before_any_work(argv):
    with pytest.raises(SystemExit):
        sweep.main(argv + ["--out", "/dev/null"])
