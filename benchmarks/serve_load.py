"""Load test of the OpenAI Serve app over loopback HTTP: request-level vs continuous batching.

Starts a local Ray (``--num-cpus``) and Serve on 127.0.0.1, and for each batching mode of
``--modes`` (the deployment's ``batching``; rounds interleave the modes, ``--repeats`` times):

- ``request``: request-level batching on the step engine (per-row parameters, rows leave at
  ``max_tokens``): the stricter baseline, isolating what joining at step boundaries is worth;
- ``continuous``: rows join and leave at every step.

For each mode:

1. **saturation**: ``--clients`` closed-loop clients for ``--seconds``: completion tokens/s, req/s;
2. **open loop**: Poisson arrivals at ``--loads`` fractions of the first mode's saturation rate
   (the same absolute rates for every mode), streaming chat requests: p50/p99 latency and time to
   the first committed token (TTFT), 5xx count;
3. **overload**: a burst of ``--burst`` concurrent requests: every refusal's latency (target < 1 s)
   and its ``Retry-After``; and, as the floor of what the HTTP path costs on this machine, a burst
   of as many ``GET /v1/models`` (no model work: Serve's proxy and the ingress only).

``--workload`` picks the requests: ``uniform`` (every request the same settings: the preset's
``max_tokens`` and threshold, temperature 0), ``mixed`` (each request, seeded by its index, draws
``max_tokens`` uniformly from 8..48 and, one in four, a strict entropy threshold of 0.1 that commits
about one token per step, as quality-first clients would ask), or ``both`` (each workload in turn,
its own capacity and ratios).

``--kill`` adds a replica-kill run for 1 and 2 replicas: open-loop load, one model replica killed
mid-run; counts failures, hangs (no answer within the client timeout) and the time until
requests succeed again.

``--overload F`` runs only this instead: one continuously batching replica, its capacity measured
with ``--max-batch`` closed-loop clients for ``--capacity-seconds``, then Poisson arrivals at F times
that rate for ``--seconds`` while ``/health`` and ``/ready`` are probed every 0.2 s. It reports
client timeouts, refusals (429) and their latency, accepted requests' latency against the queue
budget (``--queue-budget``) plus one request's decode time (the capacity run's median latency),
and the probes' latency, with the machine's load average before, during and after. The load generator
is aiohttp (see :func:`session`); each burst also times
the floor from httpx's client, the one earlier runs used. Writes one JSON file with every run, the
command, the hardware and the machine load.

    OMP_NUM_THREADS=1 python benchmarks/serve_load.py --out runs/bench/serve_load.json --kill
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import platform
import random
import re
import socket
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import aiohttp  # noqa: E402  (comes with ray[serve])
import httpx  # noqa: E402

logger = logging.getLogger("d3ray.serve_load")

APP = "d3ray-load"
MODES = ("request", "continuous")  # the deployment's batching, the baseline first (the app's batching from
# before the step engine is a benchmark-only engine: benchmarks/engine_batching.py runs it in process)
WORKLOADS = ("uniform", "mixed")
MIXED_MAX_TOKENS = (8, 48)  # inclusive range of the mixed workload's max_tokens
MIXED_STRICT_EVERY = 4  # one request in this many asks for the strict threshold
MIXED_STRICT_THRESHOLD = 0.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))], 4)


def hardware() -> dict:
    import ray
    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__}


def body(model: str, question: str, stream: bool, workload: str = "uniform", k: int = 0) -> dict:
    """Request ``k`` of ``workload`` (see the module docstring); the same ``k`` gives the same request."""
    out = {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0, "stream": stream}
    if stream:
        out["stream_options"] = {"include_usage": True}
    if workload == "mixed":
        rng = random.Random(f"mixed-{k}")
        out["max_tokens"] = rng.randint(*MIXED_MAX_TOKENS)
        if rng.randrange(MIXED_STRICT_EVERY) == 0:
            out["sampler_params"] = {"threshold": MIXED_STRICT_THRESHOLD}
    return out


def session(connections: int, timeout: float) -> aiohttp.ClientSession:
    """The load generator's client. aiohttp, not httpx: with 200 requests in flight in one event loop,
    httpx's ``AsyncClient`` alone takes about 1.5 s to get 200 answers from a bare uvicorn app on 2 cores, and
    aiohttp 0.07 s (encode/httpx#3215), which would hide the server's own refusal latency. ``timeout``
    bounds connecting and each read, as httpx's did: a request that hears nothing for that long hangs."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout))


async def one(http: aiohttp.ClientSession, base: str, payload: dict) -> dict:
    """One request; returns status, latency, TTFT (streaming) and completion tokens."""
    t0 = time.perf_counter()
    rec = {"status": None, "latency": None, "ttft": None, "tokens": 0, "retry_after": None}
    try:
        async with http.post(f"{base}/v1/chat/completions", json=payload) as r:
            rec["status"] = r.status
            rec["retry_after"] = r.headers.get("Retry-After")
            if not payload["stream"] or r.status != 200:
                data = await r.read()
                if r.status == 200:
                    rec["tokens"] = json.loads(data)["usage"]["completion_tokens"]
                elif r.status == 429:
                    rec["refusal"] = refusal_kind(data)
            else:
                async for raw in r.content:  # one SSE line at a time
                    line = raw.decode().rstrip("\r\n")
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        rec["status"] = "stream-error"
                    for c in event.get("choices", []):
                        if c.get("delta", {}).get("content") and rec["ttft"] is None:
                            rec["ttft"] = time.perf_counter() - t0
                    if event.get("usage"):
                        rec["tokens"] = event["usage"]["completion_tokens"]
    except asyncio.TimeoutError:  # aiohttp's read and connect timeouts derive from it
        rec["status"] = "timeout"
    except aiohttp.ClientError as e:
        rec["status"] = type(e).__name__
    rec["latency"] = time.perf_counter() - t0
    return rec


def refusal_kind(data: bytes) -> str:
    """A 429's reason with its numbers blanked (the ingress's, a replica's or Serve's proxy's own)."""
    try:
        message = json.loads(data)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return "proxy: " + data[:60].decode(errors="replace")
    return re.sub(r"\d+(\.\d+)?", "N", message.split(": retry")[0])[:100]


def summary(recs: list[dict], wall: float) -> dict:
    ok = [r for r in recs if r["status"] == 200]
    refused = [r["latency"] for r in recs if r["status"] == 429]
    codes: dict[str, int] = {}
    for r in recs:
        codes[str(r["status"])] = codes.get(str(r["status"]), 0) + 1
    return {"requests": len(recs), "ok": len(ok), "codes": codes, "wall_s": round(wall, 3),
            "requests_per_s": round(len(ok) / wall, 3), "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 2),
            "latency_p50_s": pct([r["latency"] for r in ok], 50), "latency_p99_s": pct([r["latency"] for r in ok], 99),
            "ttft_p50_s": pct([r["ttft"] for r in ok if r["ttft"] is not None], 50),
            "ttft_p99_s": pct([r["ttft"] for r in ok if r["ttft"] is not None], 99),
            "latency_max_s": pct([r["latency"] for r in ok], 100),
            "refused": len(refused), "refusal_latency_p50_s": pct(refused, 50),
            "refusal_latency_p99_s": pct(refused, 99), "refusal_latency_max_s": pct(refused, 100),
            "refusals_with_retry_after": sum(1 for r in recs if r["status"] == 429 and r["retry_after"]),
            "refusal_kinds": dict(collections.Counter(r["refusal"] for r in recs if r.get("refusal"))),
            "server_errors": sum(1 for r in recs if isinstance(r["status"], int) and r["status"] >= 500),
            "hangs": codes.get("timeout", 0)}


async def closed_loop(base: str, model: str, questions: list[str], clients: int, seconds: float,
                      timeout: float, workload: str = "uniform") -> dict:
    recs: list[dict] = []
    stop = time.perf_counter() + seconds
    start = time.perf_counter()

    async def worker(i: int, http: aiohttp.ClientSession) -> None:
        k = i
        while time.perf_counter() < stop:
            recs.append(await one(http, base, body(model, questions[k % len(questions)], False, workload, k)))
            k += clients

    async with session(clients + 4, timeout) as http:
        await asyncio.gather(*(worker(i, http) for i in range(clients)))
    return summary(recs, time.perf_counter() - start)


async def open_loop(base: str, model: str, questions: list[str], rate: float, seconds: float, timeout: float,
                    seed: int, during=None, workload: str = "uniform", stream: bool = True) -> dict:
    """Poisson arrivals at ``rate`` req/s for ``seconds``; ``during(t)`` is awaited once at t = seconds / 3."""
    rng = random.Random(seed)
    tasks, stamps = [], []
    start = time.perf_counter()
    async with session(1000, timeout) as http:
        t, k, fired = 0.0, 0, during is None
        while t < seconds:
            t += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
            if not fired and t >= seconds / 3:
                fired = True
                stamps.append(("event", time.perf_counter() - start))
                await during()
            payload = body(model, questions[k % len(questions)], stream, workload, k)
            tasks.append(asyncio.ensure_future(one(http, base, payload)))
            stamps.append(("sent", time.perf_counter() - start))
            k += 1
        recs = list(await asyncio.gather(*tasks))
    out = summary(recs, time.perf_counter() - start)
    out.update(rate=rate, arrivals=len(tasks))
    if during is not None:  # failures around the event, and when requests succeed again
        event_at = next(s for kind, s in stamps if kind == "event")
        sent = [s for kind, s in stamps if kind == "sent"]
        after = [(s, r) for s, r in zip(sent, recs) if s >= event_at]
        first_ok = next((s for s, r in after if r["status"] == 200), None)
        out["recovered_after_s"] = None if first_ok is None else round(first_ok - event_at, 3)
        out["failed"] = sum(1 for r in recs if r["status"] != 200)
    return out


async def burst(base: str, model: str, questions: list[str], n: int, timeout: float) -> dict:
    slow = {"sampler_params": {"threshold": 0.0}}  # one token per step: the queues fill
    start = time.perf_counter()
    async with session(n + 4, timeout) as http:
        recs = await asyncio.gather(*(one(http, base, {**body(model, questions[i % len(questions)], False), **slow})
                                      for i in range(n)))
    refused = [r for r in recs if r["status"] in (429, 503)]
    out = summary(recs, time.perf_counter() - start)
    out.update(refused=len(refused), refusal_latency_max_s=pct([r["latency"] for r in refused], 100),
               refusal_latency_p50_s=pct([r["latency"] for r in refused], 50),
               refusals_with_retry_after=sum(1 for r in refused if r["retry_after"]))
    out["http_floor"] = await http_floor(base, n, timeout)
    out["http_floor_httpx"] = await http_floor_httpx(base, n, timeout)
    return out


async def timed_get(http: aiohttp.ClientSession, url: str) -> tuple[int | str, float]:
    """One GET: its status code (or the name of its failure, "timeout" included) and seconds."""
    t0 = time.perf_counter()
    try:
        async with http.get(url) as r:
            await r.read()
            status: int | str = r.status
    except asyncio.TimeoutError:
        status = "timeout"
    except aiohttp.ClientError as e:
        status = type(e).__name__
    return status, time.perf_counter() - t0


async def http_floor(base: str, n: int, timeout: float) -> dict:
    """``n`` concurrent ``GET /v1/models``: what Serve's proxy and the ingress alone cost for a burst."""

    async def get(http: aiohttp.ClientSession) -> tuple[int | str, float]:
        return await timed_get(http, f"{base}/v1/models")

    async with session(n + 4, timeout) as http:
        got = await asyncio.gather(*(get(http) for _ in range(n)))
    return _floor(got, n)


async def http_floor_httpx(base: str, n: int, timeout: float) -> dict:
    """The same burst from httpx's ``AsyncClient`` (the client of earlier runs): how much of it is the client."""

    async def get(http: httpx.AsyncClient) -> tuple[int | str, float]:
        t0 = time.perf_counter()
        try:
            status: int | str = (await http.get(f"{base}/v1/models")).status_code
        except httpx.HTTPError as e:
            status = type(e).__name__
        return status, time.perf_counter() - t0

    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=n + 4)) as http:
        got = await asyncio.gather(*(get(http) for _ in range(n)))
    return _floor(got, n)


def _floor(got: list[tuple[int | str, float]], n: int) -> dict:
    latencies = [t for _, t in got]
    return {"requests": n, "ok": sum(1 for s, _ in got if s == 200), "latency_p50_s": pct(latencies, 50),
            "latency_max_s": pct(latencies, 100)}


def write_record(args, load_before: tuple[float, ...], ratios: dict, **fields) -> dict:
    """A run's JSON record (the command, the hardware, the settings, the machine load, ``ratios`` and
    ``fields``), written to ``args.out`` and returned."""
    out = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "hardware": hardware(),
           "settings": {k: v for k, v in vars(args).items() if k != "out"},
           "loadavg_before": [round(x, 2) for x in load_before],
           "loadavg_after": [round(x, 2) for x in os.getloadavg()], "ratios": ratios, **fields}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    logger.info("ratios: %s", json.dumps(ratios))
    logger.info("wrote %s", path)
    return out


def deploy(app_builder, serve, base: str, args, batching: str, replicas: int) -> str:
    build = {"preset": args.preset, "num_replicas": replicas, "max_batch_size": args.max_batch,
             "request_timeout_s": args.timeout, "batching": batching, "max_queued_requests": args.queue,
             "queue_budget_s": args.queue_budget}
    if args.model:
        build["model"] = args.model
    serve.run(app_builder(build), name=APP, route_prefix="/")
    return httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]


def kill_run(ray, serve, app_builder, base: str, args, questions: list[str], replicas: int, rate: float,
             workload: str) -> dict:
    model = deploy(app_builder, serve, base, args, "continuous", replicas)
    asyncio.run(closed_loop(base, model, questions, 2, 3, args.timeout, workload))

    async def kill() -> None:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == "serve" and "D3LLMModel" in a["name"] and a["name"].startswith("SERVE_REPLICA")]
        ray.kill(ray.get_actor(sorted(names)[0], namespace="serve"), no_restart=False)

    out = asyncio.run(open_loop(base, model, questions, rate, args.kill_seconds, args.timeout, seed=99, during=kill,
                                workload=workload))
    out.update(replicas=replicas, workload=workload)
    return out


async def probes(base: str, seconds: float, timeout: float) -> dict:
    """``/health`` and ``/ready`` every 0.2 s for ``seconds``: status codes and latency of each."""
    got: dict[str, list] = {"/health": [], "/ready": []}
    async with session(4, timeout) as http:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            for path, recs in got.items():
                recs.append(await timed_get(http, f"{base}{path}"))
            await asyncio.sleep(0.2)
    return {path: {"probes": len(v), "non_200": sum(1 for s, _ in v if s != 200),
                   **{f"latency_{q}_s": pct([t for _, t in v], n) for q, n in (("p50", 50), ("p99", 99), ("max", 100))}}
            for path, v in got.items()}


def overload_run(serve, app_builder, base: str, args, questions: list[str]) -> dict:
    """``--overload F``: F times one replica's capacity, open loop (see the module docstring)."""
    model = deploy(app_builder, serve, base, args, "continuous", 1)
    asyncio.run(closed_loop(base, model, questions, 4, 3, args.timeout))  # warm-up
    capacity = asyncio.run(closed_loop(base, model, questions, args.max_batch, args.capacity_seconds, args.timeout))
    rate = args.overload * capacity["requests_per_s"]
    load_during = [round(os.getloadavg()[0], 2)]

    async def run() -> list:
        return await asyncio.gather(open_loop(base, model, questions, rate, args.seconds, args.timeout, seed=5,
                                              stream=False), probes(base, args.seconds, args.timeout))

    loaded, probed = asyncio.run(run())
    load_during.append(round(os.getloadavg()[0], 2))
    decode_s = capacity["latency_p50_s"]  # one request's decode time at a full batch
    bound = args.queue_budget + decode_s
    ready = httpx.get(f"{base}/ready", timeout=30).json()
    checks = {"client_timeouts": loaded["hangs"], "no_client_timeouts": loaded["hangs"] == 0,
              "refusals_p99_within_1s": loaded["refused"] > 0 and loaded["refusal_latency_p99_s"] <= 1.0,
              "accepted_p99_bound_s": round(bound, 3), "accepted_p99_within_bound": loaded["latency_p99_s"] <= bound,
              "every_refusal_has_retry_after": loaded["refusals_with_retry_after"] == loaded["refused"]}
    return {"factor": args.overload, "capacity": capacity, "rate": round(rate, 3), "queue_budget_s": args.queue_budget,
            "decode_s": decode_s, "ingress_request_s": ready.get("request_s"), "overload": loaded, "probes": probed,
            "loadavg_1m_during": load_during, "checks": checks}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench/serve_load.json")
    ap.add_argument("--clients", type=int, default=32, help="closed-loop clients for the saturation run")
    ap.add_argument("--seconds", type=float, default=40.0, help="length of each saturation / open-loop run")
    ap.add_argument("--loads", default="0.5,0.8", help="open-loop rates as fractions of the first mode's capacity")
    ap.add_argument("--burst", type=int, default=200, help="concurrent requests of the overload burst")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds over the modes")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"batching modes, comma-separated, from {list(MODES)}; the first sets the open-loop rates")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--queue", type=int, default=32, help="max_queued_requests of the deployment")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (server and client)")
    ap.add_argument("--kill", action="store_true", help="also kill a replica under load (1 and 2 replicas)")
    ap.add_argument("--kill-seconds", type=float, default=30.0)
    ap.add_argument("--model", default="", help="checkpoint URI (default: the preset's)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--workload", default="both", choices=[*WORKLOADS, "both"],
                    help="the requests' settings (see above); kills use the first")
    ap.add_argument("--queue-budget", type=float, default=5.0, help="queue_budget_s of the deployment")
    ap.add_argument("--overload", type=float, default=0.0,
                    help="run only the overload check at this multiple of one replica's capacity (e.g. 5)")
    ap.add_argument("--capacity-seconds", type=float, default=8.0, help="--overload: length of the capacity run")
    args = ap.parse_args(argv)
    workloads = list(WORKLOADS) if args.workload == "both" else [args.workload]
    loads = [float(x) for x in args.loads.split(",") if x.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes) or len(set(modes)) != len(modes):
        ap.error(f"--modes={args.modes!r}: name each of {list(MODES)} at most once, comma-separated")
    if args.clients < 1 or args.seconds <= 0 or args.repeats < 1 or args.burst < 1 or not all(0 < x for x in loads):
        ap.error("--clients, --seconds, --repeats, --burst and every --loads fraction must be positive")
    if args.overload < 0 or args.capacity_seconds <= 0 or not 0 < args.queue_budget < args.timeout:
        ap.error("--overload must be >= 0, --capacity-seconds > 0, and --queue-budget in (0, --timeout)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import ray
    from ray import serve

    from d3core.eval import synthetic
    from serve_apps.openai_app import app_builder

    questions = [p.question for p in synthetic.generate("test", 128, seed=7)]
    load_before = os.getloadavg()
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    kills = []
    if args.overload:
        try:
            result = overload_run(serve, app_builder, base, args, questions)
        finally:
            serve.shutdown()
            ray.shutdown()
        logger.info("overload: %s", json.dumps(result["checks"]))
        return write_record(args, load_before, {}, overload=result)
    try:
        capacity: dict[str, float] = {}
        for rep in range(args.repeats):
            for mode in modes:  # interleaved: machine drift hits every mode
                model = deploy(app_builder, serve, base, args, mode, 1)
                for workload in workloads:
                    asyncio.run(closed_loop(base, model, questions, 4, 3, args.timeout, workload))  # warm-up
                    run = {"repeat": rep, "workload": workload, "loadavg_1m": round(os.getloadavg()[0], 2)}
                    run["saturation"] = asyncio.run(closed_loop(base, model, questions, args.clients, args.seconds,
                                                                args.timeout, workload))
                    if workload not in capacity and mode == modes[0]:
                        capacity[workload] = run["saturation"]["requests_per_s"]
                    run["open_loop"] = {str(f): asyncio.run(open_loop(base, model, questions, f * capacity[workload],
                                                                      args.seconds, args.timeout, seed=rep,
                                                                      workload=workload)) for f in loads}
                    run["overload"] = asyncio.run(burst(base, model, questions, args.burst, args.timeout))
                    runs[mode].append(run)
                    logger.info("%s %s round %d: %s", mode, workload, rep, json.dumps(run))
        if args.kill:
            for replicas in (1, 2):
                kills.append(kill_run(ray, serve, app_builder, base, args, questions, replicas,
                                      0.5 * capacity[workloads[0]], workloads[0]))
                logger.info("kill, %d replicas: %s", replicas, json.dumps(kills[-1]))
    finally:
        serve.shutdown()
        ray.shutdown()

    def med(mode: str, workload: str, *path) -> float | None:
        values = []
        for run in (r for r in runs[mode] if r["workload"] == workload):
            node = run
            for key in path:
                node = node[key]
            if node is not None:
                values.append(node)
        return round(statistics.median(values), 4) if values else None

    def ratio(workload: str, base_mode: str, *path) -> float | None:
        base, ct = med(base_mode, workload, *path), med("continuous", workload, *path)
        return round(ct / base, 3) if base and ct else None

    ratios = {workload: {f"continuous_vs_{b}": {
        "tokens_per_s_at_saturation": ratio(workload, b, "saturation", "tokens_per_s"),
        **{f"p99_latency_at_{f}": ratio(workload, b, "open_loop", str(f), "latency_p99_s") for f in loads}}
        for b in modes if b != "continuous" and "continuous" in modes} for workload in workloads}
    return write_record(args, load_before, ratios, capacity_rps=capacity, runs=runs, kills=kills)

if __name__ == "__main__":
    main()
