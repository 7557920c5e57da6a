"""The serving engine alone, in process: legacy vs request-level vs continuous batching.

No HTTP, no Ray: chat requests go straight to a :class:`~serve_apps.batching.ContinuousEngine`, once
per batching mode, the modes interleaved over ``--repeats`` rounds (machine drift hits every mode).
Each run is ``--clients`` closed-loop clients for ``--seconds`` (saturation), then streaming
requests with Poisson arrivals for ``--seconds`` at each ``--loads`` fraction of the first mode's
saturation rate (the same absolute rates for every mode). The requests are
``serve_load.py``'s (``--workload`` uniform or mixed), turned into engine requests by the served
app's own parsing, parameter resolution and chat template, so the figures isolate the scheduling
policy from Serve's proxy and the ingress.

Reports per run: completion tokens/s, requests/s, p50/p99 latency, the mean rows per forward and
the mean step time at saturation; p50/p99 latency and time to the first committed text (TTFT) in
the open loop; and the continuous / baseline ratios of tokens/s and of p99 latency (medians over
rounds). Writes
JSON with the command, the hardware and the machine load.

``--step-floor-ms X`` emulates a device on which a forward costs the same for 1 or 16 rows (a GPU
decoding a large model is memory-bound at these batch sizes): every forward is padded with a sleep
to at least X ms. It shows what the scheduling policy is worth there; it measures no real device.

    OMP_NUM_THREADS=1 python benchmarks/engine_batching.py --out runs/bench/engine_batching.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

logger = logging.getLogger("d3ray.engine_batching")

MODES = ("legacy", "request", "continuous")
OPEN_LOOP_QUEUE = 1024  # the engine's admission queue: an open loop at these rates never fills it
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is no package: serve_load.py by name

import serve_load  # noqa: E402  (the request mix and the hardware record)


class StepMeter:
    """The engine's metrics hook: rows and seconds of every forward."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.seconds: list[float] = []

    def on_step(self, rows: int, seconds: float, tokens: int) -> None:
        self.rows.append(rows)
        self.seconds.append(seconds)

    def on_request(self, status: str, output) -> None:
        pass


def engine_requests(cfg, tokenizer, questions: list[str], workload: str, count: int) -> list:
    """The first ``count`` requests of ``workload``, as the ingress would hand them to the engine."""
    from serve_apps import protocol as P
    from serve_apps.requests import GenerationRequest
    from serve_apps.text import encode_chat

    out = []
    for k in range(count):
        payload = serve_load.body(cfg.model_name, questions[k % len(questions)], False, workload, k)
        req = P.parse_request(json.dumps(payload).encode(), P.ChatCompletionRequest)
        params, max_tokens = P.resolve_params(cfg, req)
        ids = encode_chat(tokenizer, req.messages)
        out.append(GenerationRequest(tuple(ids), params, max_tokens, None, 1, req.stop_strings, False,
                                     cfg.request_timeout_s, f"bench-{k}"))
    return out


async def closed_loop(engine, requests: list, clients: int, seconds: float) -> dict:
    latencies, tokens = [], 0
    stop = time.perf_counter() + seconds
    start = time.perf_counter()

    async def client(i: int) -> None:
        nonlocal tokens
        k = i
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            out = await engine.generate(requests[k % len(requests)])
            latencies.append(time.perf_counter() - t0)
            tokens += out.completion_tokens
            k += clients

    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - start
    return {"requests": len(latencies), "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "requests_per_s": round(len(latencies) / wall, 3),
            "latency_p50_s": serve_load.pct(latencies, 50), "latency_p99_s": serve_load.pct(latencies, 99)}


async def open_loop(engine, requests: list, rate: float, seconds: float, seed: int) -> dict:
    """Streaming requests with Poisson arrivals at ``rate`` per second for ``seconds``."""
    from serve_apps.outputs import Delta
    from serve_apps.requests import EngineOverloaded

    async def one(req) -> tuple[float, float | None] | None:
        t0, ttft = time.perf_counter(), None
        try:
            async for event in engine.stream(req):
                if ttft is None and isinstance(event, Delta) and event.text:
                    ttft = time.perf_counter() - t0
        except EngineOverloaded:
            return None
        return time.perf_counter() - t0, ttft

    rng, tasks, t = random.Random(seed), [], 0.0
    start = time.perf_counter()
    while t < seconds:
        t += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
        tasks.append(asyncio.ensure_future(one(requests[len(tasks) % len(requests)])))
    done = [r for r in await asyncio.gather(*tasks) if r is not None]
    latencies, ttfts = [r[0] for r in done], [r[1] for r in done if r[1] is not None]
    return {"rate": round(rate, 3), "arrivals": len(tasks), "refused": len(tasks) - len(done),
            "latency_p50_s": serve_load.pct(latencies, 50), "latency_p99_s": serve_load.pct(latencies, 99),
            "ttft_p50_s": serve_load.pct(ttfts, 50), "ttft_p99_s": serve_load.pct(ttfts, 99)}


def floor_forward(model, floor_s: float) -> None:
    """Pad every forward of ``model`` with a sleep to at least ``floor_s`` (see ``--step-floor-ms``)."""
    forward = model.forward_windows

    def padded(*args, **kwargs):
        started = time.perf_counter()
        out = forward(*args, **kwargs)
        time.sleep(max(0.0, started + floor_s - time.perf_counter()))
        return out

    model.forward_windows = padded


async def one_run(model, tokenizer, cfg, requests: list, mode: str, args, capacity: float | None,
                  seed: int) -> dict:
    """Saturation, then the open loop at ``args.loads`` x ``capacity`` (this run's own rate when None)."""
    from legacy_engine import LegacyEngine

    from serve_apps.batching import ContinuousEngine

    meter = StepMeter()
    engine_cls, batching = (LegacyEngine, "request") if mode == "legacy" else (ContinuousEngine, mode)
    engine = engine_cls(model, tokenizer, cfg.sampler, args.max_batch, max_queued=OPEN_LOOP_QUEUE,
                        batching=batching, batch_wait_timeout_s=cfg.batch_wait_timeout_s, metrics=meter)
    try:
        if args.warmup:
            await closed_loop(engine, requests, min(4, args.clients), args.warmup)
        meter.rows.clear()
        meter.seconds.clear()
        sat = await closed_loop(engine, requests, args.clients, args.seconds)
        sat["rows_per_step"] = round(statistics.fmean(meter.rows), 2) if meter.rows else None
        sat["step_ms"] = round(1000 * statistics.fmean(meter.seconds), 2) if meter.seconds else None
        sat["steps"] = len(meter.rows)
        rate = capacity or sat["requests_per_s"]
        opened = {str(f): await open_loop(engine, requests, f * rate, args.seconds, seed) for f in args.load_list}
    finally:
        await engine.close()
    return {"saturation": sat, "open_loop": opened}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench/engine_batching.json")
    ap.add_argument("--clients", type=int, default=32, help="closed-loop clients")
    ap.add_argument("--seconds", type=float, default=15.0, help="length of each saturation and open-loop run")
    ap.add_argument("--loads", default="0.5,0.8", help="open-loop rates as fractions of the first mode's capacity "
                                                        "(empty: no open loop)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds over the modes")
    ap.add_argument("--max-batch", type=int, default=16, help="the engine's rows")
    ap.add_argument("--workload", default="both", choices=["uniform", "mixed", "both"])
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {list(MODES)}")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a replica's default is 1)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of 4 clients before each run")
    ap.add_argument("--step-floor-ms", type=float, default=0.0,
                    help="pad every forward to at least this long (emulates a row-independent step cost; 0: off)")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes) or len(set(modes)) != len(modes):
        ap.error(f"--modes={args.modes!r}: name each of {list(MODES)} at most once, comma-separated")
    if args.clients < 1 or args.seconds <= 0 or args.repeats < 1 or args.max_batch < 1 or args.threads < 1:
        ap.error("--clients, --seconds, --repeats, --max-batch and --threads must be positive")
    if args.warmup < 0 or args.step_floor_ms < 0:
        ap.error("--warmup and --step-floor-ms must be >= 0")
    try:
        args.load_list = [float(x) for x in args.loads.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--loads={args.loads!r}: write fractions of capacity, comma-separated, e.g. 0.5,0.8")
    if not all(0 < f <= 1.5 for f in args.load_list):
        ap.error(f"--loads={args.loads!r}: every fraction must lie in (0, 1.5]")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import torch

    from d3core.eval import synthetic
    from d3core.models.checkpoint import load_pretrained
    from d3core.models.tokenizer import load_tokenizer
    from serve_apps.config import ServeConfig

    torch.set_num_threads(args.threads)
    cfg = ServeConfig.from_preset(args.preset)
    model = load_pretrained(cfg.model, device="cpu").eval()
    if args.step_floor_ms:
        floor_forward(model, args.step_floor_ms / 1000)
    tokenizer = load_tokenizer(cfg.tokenizer_uri, cfg.trust_remote_code)
    questions = [p.question for p in synthetic.generate("test", 128, seed=7)]
    workloads = ["uniform", "mixed"] if args.workload == "both" else [args.workload]
    requests = {w: engine_requests(cfg, tokenizer, questions, w, 256) for w in workloads}
    load_before = os.getloadavg()
    runs: dict[str, dict[str, list[dict]]] = {w: {m: [] for m in modes} for w in workloads}
    capacity: dict[str, float] = {}
    for rep in range(args.repeats):
        for workload in workloads:
            for mode in modes:
                run = asyncio.run(one_run(model, tokenizer, cfg, requests[workload], mode, args,
                                          capacity.get(workload), seed=rep))
                capacity.setdefault(workload, run["saturation"]["requests_per_s"])
                run.update(repeat=rep, loadavg_1m=round(os.getloadavg()[0], 2))
                runs[workload][mode].append(run)
                logger.info("%s %s round %d: %s", workload, mode, rep, json.dumps(run))

    def med(workload: str, mode: str, *path) -> float | None:
        values = []
        for run in runs[workload][mode]:
            for key in path:
                run = run[key]
            if run is not None:
                values.append(run)
        return statistics.median(values) if values else None

    def ratio(workload: str, base: str, *path) -> float | None:
        low, ct = med(workload, base, *path), med(workload, "continuous", *path)
        return round(ct / low, 3) if low and ct else None

    ratios = {w: {f"continuous_vs_{b}": {
        "tokens_per_s_at_saturation": ratio(w, b, "saturation", "tokens_per_s"),
        **{f"p99_latency_at_{f}": ratio(w, b, "open_loop", str(f), "latency_p99_s") for f in args.load_list}}
        for b in modes if b != "continuous" and "continuous" in modes} for w in workloads}
    return serve_load.write_record(args, load_before, ratios, capacity_rps=capacity, runs=runs)


if __name__ == "__main__":
    main()
