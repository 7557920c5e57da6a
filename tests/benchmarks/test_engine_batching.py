"""The in-process batching benchmark: its request mix is the served app's, and a short run reports each mode."""

from __future__ import annotations

import json

import pytest

from benchmark_module import load_benchmark

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("engine_batching")


def test_requests_carry_the_workloads_settings(bench, tok):
    from serve_apps.config import ServeConfig

    cfg = ServeConfig.from_preset("tiny")
    mixed = bench.engine_requests(cfg, tok, ["What is 2 plus 3?"], "mixed", 40)
    uniform = bench.engine_requests(cfg, tok, ["What is 2 plus 3?"], "uniform", 4)
    payloads = [bench.serve_load.body(cfg.model_name, "q", False, "mixed", k) for k in range(40)]
    assert [r.max_tokens for r in mixed] == [p["max_tokens"] for p in payloads]
    strict = [r.params.threshold == bench.serve_load.MIXED_STRICT_THRESHOLD for r in mixed]
    assert strict == ["sampler_params" in p for p in payloads] and any(strict)
    assert {r.max_tokens for r in uniform} == {None} and len({r.prompt_ids for r in uniform}) == 1
    assert uniform[0].params == cfg.default_params()


def test_a_short_run_reports_each_mode_and_pads_forwards_to_the_floor(bench, tmp_path):
    out_path = tmp_path / "eb.json"
    out = bench.main(["--seconds", "0.6", "--warmup", "0", "--repeats", "1", "--workload", "mixed", "--clients", "6",
                      "--max-batch", "4", "--modes", "request,continuous", "--step-floor-ms", "25", "--loads", "0.8",
                      "--out", str(out_path)])
    assert json.loads(out_path.read_text()) == out
    runs = out["runs"]["mixed"]
    assert set(runs) == {"request", "continuous"}
    for mode in ("request", "continuous"):
        sat, opened = runs[mode][0]["saturation"], runs[mode][0]["open_loop"]["0.8"]
        assert sat["requests"] > 0 and sat["tokens_per_s"] > 0
        assert 1 <= sat["rows_per_step"] <= 4  # never more rows than the engine has
        assert sat["step_ms"] >= 25  # every forward padded to the floor
        assert opened["arrivals"] > 0 and opened["refused"] == 0 and opened["latency_p99_s"] is not None
        assert opened["ttft_p50_s"] <= opened["latency_p50_s"]
    # the open loop runs at the same absolute rate for every mode: 0.8 x the first mode's capacity
    assert runs["request"][0]["open_loop"]["0.8"]["rate"] == runs["continuous"][0]["open_loop"]["0.8"]["rate"] \
        == round(0.8 * out["capacity_rps"]["mixed"], 3)
    assert set(out["ratios"]["mixed"]["continuous_vs_request"]) == {"tokens_per_s_at_saturation",
                                                                   "p99_latency_at_0.8"}


def test_bad_arguments_are_refused(bench):
    with pytest.raises(SystemExit):
        bench.main(["--modes", "continuous,step"])
    with pytest.raises(SystemExit):
        bench.main(["--step-floor-ms", "-1"])
    with pytest.raises(SystemExit):
        bench.main(["--loads", "0.5,lots"])
