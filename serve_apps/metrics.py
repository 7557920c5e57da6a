"""Metrics of the serving app.

Two exports:

* ``GET /metrics`` on the HTTP port (Prometheus text format), from the ingress's own registry:
  every HTTP request by method, route and the status code actually sent (500s included), their
  latency, requests in flight, and per-request tokens, NFE and TPF;
* Ray's metrics port (``ray.serve.metrics``, ``ray_`` prefix, Serve's deployment/replica tags) for
  the decode engine: steps, rows per step, committed tokens, requests by status.

Nothing here may raise into a request or the scheduler: a zero-token step records nothing rather
than calling ``Counter.inc(0)`` (which Ray rejects).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from serve_apps.requests import GenerationOutput

LATENCY_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
TPF_BOUNDARIES = [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0]
NFE_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
FORWARDS_BOUNDARIES = [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HttpMetrics:
    """The ingress's Prometheus registry, served at ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("d3ray_http_requests", "HTTP requests by method, route and status code.",
                                ("method", "route", "status_code"), registry=r)
        self.latency = Histogram("d3ray_http_request_duration_seconds", "End-to-end HTTP latency.", ("route",),
                                 buckets=LATENCY_BOUNDARIES, registry=r)
        self.inflight = Gauge("d3ray_http_inflight_requests", "HTTP requests being served now.", registry=r)
        self.prompt_tokens = Counter("d3ray_prompt_tokens", "Prompt tokens of answered requests.", registry=r)
        self.completion_tokens = Counter("d3ray_completion_tokens", "Completion tokens of answered requests.",
                                         registry=r)
        self.nfe = Histogram("d3ray_request_nfe", "Model forwards of each answered choice.", buckets=NFE_BOUNDARIES,
                             registry=r)
        self.tpf = Histogram("d3ray_request_tpf", "Tokens per forward of each answered choice.",
                             buckets=TPF_BOUNDARIES, registry=r)
        self.forwards = Histogram("d3ray_request_token_forwards_per_token",
                                  "Token-forwards per committed token of each answered choice (device-independent "
                                  "cost: window tokens recomputed / slots committed).", buckets=FORWARDS_BOUNDARIES,
                                  registry=r)
        self.batch = Histogram("d3ray_request_batch_size", "Most rows that shared a step with a request.",
                               buckets=BATCH_BOUNDARIES, registry=r)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def on_output(self, out: GenerationOutput) -> None:
        if out.prompt_tokens:
            self.prompt_tokens.inc(out.prompt_tokens)
        if out.completion_tokens:
            self.completion_tokens.inc(out.completion_tokens)
        for c in out.choices:
            self.nfe.observe(c.nfe)
            self.tpf.observe(len(c.token_ids) / max(c.nfe, 1))
            if c.tokens_committed:
                self.forwards.observe(c.tokens_computed / c.tokens_committed)
        self.batch.observe(out.batch_size)

    def render(self) -> bytes:
        return generate_latest(self.registry)


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
    """Decode-engine metrics on Ray's metrics port."""

    def __init__(self, model_name: str) -> None:
        from ray.serve import metrics

        tags = {"model": model_name}
        self.requests = metrics.Counter("d3ray_engine_requests", "Decode requests by final status.",
                                        ("model", "status"))
        self.latency = metrics.Histogram("d3ray_engine_request_seconds", "Queue + decode time of a request.",
                                         LATENCY_BOUNDARIES, ("model",))
        self.steps = metrics.Counter("d3ray_engine_steps", "Decode steps.", ("model",))
        self.tokens = metrics.Counter("d3ray_engine_committed_tokens", "Tokens that became final.", ("model",))
        self.rows = metrics.Histogram("d3ray_engine_rows_per_step", "Rows decoded together in a step.",
                                      BATCH_BOUNDARIES, ("model",))
        for m in (self.requests, self.latency, self.steps, self.tokens, self.rows):
            m.set_default_tags(dict(tags))

    def on_step(self, rows: int, seconds: float, tokens: int) -> None:
        self.steps.inc(1)
        self.rows.observe(rows)
        if tokens > 0:
            self.tokens.inc(tokens)

    def on_request(self, status: str, output: GenerationOutput | None) -> None:
        self.requests.inc(1, {"status": status})
        if output is not None:
            self.latency.observe(output.queue_s + output.decode_s)


def engine_metrics(model_name: str) -> EngineMetrics | None:
    return EngineMetrics(model_name) if _in_serve_replica() else None
