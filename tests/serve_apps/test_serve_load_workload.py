"""The load benchmark's request mix: reproducible, spread out as documented, and valid for the tiny server."""

from __future__ import annotations

import json

import pytest

from serve_apps import protocol as P
from serve_apps.config import ServeConfig

from benchmark_module import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("serve_load")


def test_uniform_requests_carry_only_the_presets_settings(bench):
    for k in range(20):
        payload = bench.body("m", "q?", stream=False, workload="uniform", k=k)
        assert "max_tokens" not in payload and "sampler_params" not in payload


def test_mixed_requests_are_reproducible_spread_and_accepted(bench):
    cfg = ServeConfig.from_preset("tiny")
    payloads = [bench.body("m", "q?", stream=True, workload="mixed", k=k) for k in range(400)]
    assert payloads == [bench.body("m", "q?", stream=True, workload="mixed", k=k) for k in range(400)]
    lengths = [p["max_tokens"] for p in payloads]
    low, high = bench.MIXED_MAX_TOKENS
    assert min(lengths) == low and max(lengths) == high and len(set(lengths)) > 30
    strict = [p for p in payloads if "sampler_params" in p]
    assert 0.15 < len(strict) / len(payloads) < 0.35  # one in four, by a seeded draw
    assert {p["sampler_params"]["threshold"] for p in strict} == {bench.MIXED_STRICT_THRESHOLD}
    for p in payloads[:50]:  # the server takes every one of them (no 400 from the benchmark's own mix)
        req = P.parse_request(json.dumps(p).encode(), P.ChatCompletionRequest)
        params, max_tokens = P.resolve_params(cfg, req)
        assert max_tokens == p["max_tokens"] <= params.gen_length
        assert params.threshold == p.get("sampler_params", {}).get("threshold", cfg.sampler_params["threshold"])


def test_the_summary_separates_refusals_and_names_their_reasons(bench):
    ok = {"status": 200, "latency": 2.0, "ttft": None, "tokens": 10, "retry_after": None}
    refusal = {"status": 429, "latency": 0.1, "ttft": None, "tokens": 0, "retry_after": "1",
               "refusal": bench.refusal_kind(json.dumps(P.APIError(429, "server overloaded: 48 of 48 rows are taken: "
                                                                      "retry after 1 s").body()).encode())}
    proxy = {"status": 429, "latency": 0.3, "ttft": None, "tokens": 0, "retry_after": "1",
             "refusal": bench.refusal_kind(b"Request dropped due to backpressure (num_queued_requests=9)")}
    out = bench.summary([ok, refusal, proxy, {**ok, "status": "timeout"}], wall=1.0)
    assert out["ok"] == 1 and out["refused"] == 2 and out["hangs"] == 1 and out["refusals_with_retry_after"] == 2
    assert out["refusal_latency_max_s"] == 0.3 and out["latency_max_s"] == 2.0
    assert out["refusal_kinds"] == {"server overloaded: N of N rows are taken": 1,
                                    "proxy: Request dropped due to backpressure (num_queued_requests=9)": 1}
