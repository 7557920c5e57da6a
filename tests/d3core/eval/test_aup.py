"""AUP against the published d3LLM leaderboard (research digest section 4.1) and its definition."""

from __future__ import annotations

import math

import pytest

from d3core.eval.aup import Point, aup, aup_by_system, kept_points, task_y_max, weight

# (y_max of the task, accuracy at TPF 1, operating TPF, accuracy there, published AUP)
LLADA = {"gsm8k": 74.98, "math": 41.15, "mbpp": 63.6, "humaneval": 67.73, "long_gsm8k": 82.56}
DREAM = {"gsm8k": 83.94, "math": 49.92, "mbpp": 63.8, "humaneval": 72.25, "long_gsm8k": 82.56}
PUBLISHED = [
    ("d3LLM-LLaDA", LLADA["gsm8k"], 74.02, 9.11, 73.09, 637.7),
    ("d3LLM-LLaDA", LLADA["math"], 32.76, 5.74, 30.36, 107.6),
    ("d3LLM-LLaDA", LLADA["mbpp"], 42.0, 4.21, 40.60, 88.4),
    ("d3LLM-LLaDA", LLADA["humaneval"], 39.8, 5.95, 39.63, 96.6),
    ("d3LLM-LLaDA", LLADA["long_gsm8k"], 78.32, 6.95, 74.22, 441.1),
    ("dParallel-LLaDA", LLADA["gsm8k"], 74.0, 5.14, 72.63, 358.1),
    ("dParallel-LLaDA", LLADA["math"], 32.0, 3.17, 30.18, 64.5),
    ("dParallel-LLaDA", LLADA["humaneval"], 39.68, 4.93, 39.02, 83.7),
    ("Fast-dLLM-LLaDA", LLADA["gsm8k"], 74.79, 2.77, 74.68, 205.8),
    ("Fast-dLLM-LLaDA", LLADA["mbpp"], 41.58, 2.13, 38.6, 56.6),
    ("D2F", LLADA["gsm8k"], 74.98, 2.88, 74.39, 213.8),
    ("D2F", LLADA["long_gsm8k"], 76.00, 2.7, 75.66, 176.9),
    ("d3LLM-Dream", DREAM["gsm8k"], 83.47, 4.94, 81.36, 391.3),
    ("d3LLM-Dream", DREAM["math"], 39.38, 3.92, 38.21, 97.5),
    ("d3LLM-Dream", DREAM["mbpp"], 58.8, 2.96, 55.60, 141.4),
    ("d3LLM-Dream", DREAM["humaneval"], 58.86, 3.20, 57.10, 129.5),
    ("d3LLM-Dream", DREAM["long_gsm8k"], 81.2, 4.80, 77.18, 348.6),
    ("Fast-dLLM-Dream", DREAM["gsm8k"], 83.68, 1.44, 79.0, 116.5),
    ("Fast-dLLM-v2-7B", DREAM["math"], 49.92, 2.61, 48.74, 126.7),
    ("dParallel-Dream", DREAM["long_gsm8k"], 81.27, 3.49, 78.56, 262.4),
]
# EAGLE-3 enters as (1, acc) and (TPF, acc) with the same accuracy
EAGLE = [(DREAM["gsm8k"], 5.12, 76.57, 319.0), (DREAM["math"], 5.72, 39.80, 142.1),
         (DREAM["mbpp"], 5.69, 60.20, 298.6), (DREAM["humaneval"], 5.98, 67.58, 344.8),
         (DREAM["long_gsm8k"], 5.57, 80.52, 422.2)]


@pytest.mark.parametrize("name,y_max,y1,tpf,y2,expected", PUBLISHED, ids=[f"{p[0]}-{i}" for i, p in
                                                                          enumerate(PUBLISHED)])
def test_reproduces_published_leaderboard_cells(name, y_max, y1, tpf, y2, expected):
    assert aup([(1.0, y1), (tpf, y2)], y_max) == pytest.approx(expected, abs=0.051)


@pytest.mark.parametrize("y_max,tpf,acc,expected", EAGLE)
def test_reproduces_published_eagle3_cells(y_max, tpf, acc, expected):
    assert aup([(1.0, acc), (tpf, acc)], y_max) == pytest.approx(expected, abs=0.051)


def test_published_family_average():
    d3llm_llada = [p for p in PUBLISHED if p[0] == "d3LLM-LLaDA"]
    mean = sum(aup([(1.0, y1), (t, y2)], ym) for _, ym, y1, t, y2, _ in d3llm_llada) / 5
    assert mean == pytest.approx(274.3, abs=0.051)


def test_worked_example_weights():
    assert weight(74.02, 74.98) == pytest.approx(0.9623, abs=1e-4)
    assert weight(73.09, 74.98) == pytest.approx(0.9272, abs=1e-4)
    assert weight(80.0, 74.98) == 1.0  # capped at 1


def test_single_point_at_tpf_one_scores_its_accuracy():
    assert aup([(1.0, 74.1)], 74.98) == pytest.approx(74.1)


def test_points_are_sorted_by_tpf_before_integrating():
    pts = [(3.0, 70.0), (1.0, 72.0), (2.0, 71.0)]
    assert aup(pts, 72.0) == pytest.approx(aup(sorted(pts), 72.0))


def test_five_point_drop_filter_removes_points():
    base = [(1.0, 70.0), (2.0, 68.0)]
    with_bad = base + [(8.0, 64.9)]  # 5.1 below the lowest-TPF accuracy: dropped
    assert [p.tpf for p in kept_points(with_bad)] == [1.0, 2.0]
    assert aup(with_bad, 70.0) == pytest.approx(aup(base, 70.0))
    exactly_five = base + [(8.0, 65.0)]  # exactly 5 below: kept
    assert aup(exactly_five, 70.0) > aup(base, 70.0)


def test_lower_accuracy_is_weighted_down():
    y_max = 80.0
    flat = aup([(1.0, 80.0), (5.0, 80.0)], y_max)
    assert flat == pytest.approx(80.0 + 0.5 * 4 * 160.0)  # no loss: plain trapezoid
    lossy = aup([(1.0, 80.0), (5.0, 76.0)], y_max)
    w = math.exp(-3 * (1 - 76 / 80))
    assert lossy == pytest.approx(80.0 + 0.5 * 4 * (80.0 + 76.0 * w))
    assert lossy < 80.0 + 0.5 * 4 * (80.0 + 76.0)


def test_task_level_y_max_is_over_all_systems():
    systems = {"ar": [(1.0, 90.0)], "dllm": [(1.0, 70.0), (4.0, 69.0)]}
    assert task_y_max(systems) == 90.0
    scores = aup_by_system(systems)
    assert scores["ar"] == pytest.approx(90.0)
    assert scores["dllm"] == pytest.approx(aup(systems["dllm"], 90.0))
    assert scores["dllm"] < aup(systems["dllm"], 70.0)  # a stronger baseline lowers the dLLM's weights


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="percent"):
        Point(1.0, 150.0)
    with pytest.raises(ValueError, match="TPF"):
        Point(0.0, 50.0)
    with pytest.raises(ValueError, match="empty"):
        aup([], 50.0)
    with pytest.raises(ValueError, match="y_max"):
        aup([(1.0, 60.0)], 50.0)
