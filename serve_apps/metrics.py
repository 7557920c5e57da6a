"""Prometheus metrics of the serving app through ``ray.serve.metrics``.

Ray exports them on each node's metrics port (``ray_`` prefix, e.g. ``ray_d3ray_requests_total``);
Serve adds the deployment, replica and application tags. Outside a Serve replica (unit tests)
:func:`engine_metrics` and :func:`http_metrics` return ``None`` and nothing is recorded.
"""

from __future__ import annotations

import logging
from typing import Sequence

from serve_apps.engine import GenerationOutput

logger = logging.getLogger(__name__)

LATENCY_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
TPF_BOUNDARIES = [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0]
NFE_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64]


def _in_serve_replica() -> bool:
    try:
        from ray import serve
        from ray.serve.exceptions import RayServeException
    except ImportError:
        return False
    try:
        serve.get_replica_context()
    except RayServeException:
        return False
    return True


class EngineMetrics:
    """Decoder-side metrics: requests by status, latency, tokens, tokens/s, TPF, NFE, batch size."""

    def __init__(self, model_name: str) -> None:
        from ray.serve import metrics

        tags = {"model": model_name}
        self.requests = metrics.Counter("d3ray_requests", "Decode requests by final status.", ("model", "status"))
        self.latency = metrics.Histogram("d3ray_request_latency_seconds", "Queue + decode time of a request.",
                                         LATENCY_BOUNDARIES, ("model",))
        self.tokens = metrics.Counter("d3ray_generated_tokens", "Generated (response) tokens.", ("model",))
        self.tokens_per_s = metrics.Gauge("d3ray_tokens_per_second", "Generated tokens / s of the last batch.",
                                          ("model",))
        self.tpf = metrics.Histogram("d3ray_tpf", "Tokens per forward of each request.", TPF_BOUNDARIES, ("model",))
        self.nfe = metrics.Histogram("d3ray_nfe", "Model forwards of each request.", NFE_BOUNDARIES, ("model",))
        self.batch_size = metrics.Histogram("d3ray_batch_size", "Requests decoded together.", BATCH_BOUNDARIES,
                                            ("model",))
        for m in (self.requests, self.latency, self.tokens, self.tokens_per_s, self.tpf, self.nfe, self.batch_size):
            m.set_default_tags(dict(tags))

    def on_batch(self, size: int, seconds: float, tokens: int, nfe: Sequence[int]) -> None:
        self.batch_size.observe(size)
        self.tokens.inc(tokens)
        self.tokens_per_s.set(tokens / max(seconds, 1e-9))

    def on_request(self, status: str, output: GenerationOutput | None) -> None:
        self.requests.inc(1, {"status": status})
        if output is not None:
            self.latency.observe(output.queue_s + output.decode_s)
            self.tpf.observe(output.tpf)
            self.nfe.observe(output.nfe)


class HttpMetrics:
    """Ingress-side metrics: HTTP requests by route and status code, end-to-end latency."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.requests = metrics.Counter("d3ray_http_requests", "HTTP requests by route and status code.",
                                        ("route_path", "status_code"))
        self.latency = metrics.Histogram("d3ray_http_latency_seconds", "End-to-end HTTP latency.",
                                         LATENCY_BOUNDARIES, ("route_path",))

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(1, {"route_path": route, "status_code": str(status)})
        self.latency.observe(seconds, {"route_path": route})


def engine_metrics(model_name: str) -> EngineMetrics | None:
    return EngineMetrics(model_name) if _in_serve_replica() else None


def http_metrics() -> HttpMetrics | None:
    return HttpMetrics() if _in_serve_replica() else None
