"""Load test of the OpenAI Serve app over loopback HTTP: replicas 1 vs 2, batching on vs off.

Starts a local Ray (``--num-cpus``) and Serve on 127.0.0.1 (a free port), deploys the app once
per scenario (``num_replicas`` x ``max_batch_size``), and drives it with ``--clients`` concurrent
clients sending chat requests (temperature 0, synthetic questions) until ``--requests`` are
done or ``--seconds`` have passed. Writes JSON: per scenario requests/s, latency p50/p99,
generated tokens/s, mean batch size, TPF and NFE, errors (medians over ``--repeats``
interleaved rounds, every run kept); plus the speed-up ratios, the command, the hardware and
the machine load before and after.

    OMP_NUM_THREADS=1 python benchmarks/serve_load.py --out runs/bench/serve_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402

logger = logging.getLogger("d3ray.serve_load")

APP = "d3ray-load"


@dataclass(frozen=True)
class Scenario:
    name: str
    num_replicas: int
    max_batch_size: int

    def __post_init__(self) -> None:
        if self.num_replicas < 1 or self.max_batch_size < 1:
            raise ValueError(f"scenario {self.name}: num_replicas and max_batch_size must be >= 1")


SCENARIOS = {
    "r1-batch": Scenario("r1-batch", 1, 16),
    "r2-batch": Scenario("r2-batch", 2, 16),
    "r1-nobatch": Scenario("r1-nobatch", 1, 1),
    "r2-nobatch": Scenario("r2-nobatch", 2, 1),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def summarize(runs: list[dict]) -> dict:
    """Median over repeats of every numeric figure; errors summed."""
    out: dict = {"repeats": len(runs)}
    for key, value in runs[0].items():
        if key in ("repeat", "errors"):
            continue
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = round(statistics.median(values), 4) if values and isinstance(value, (int, float)) else value
    out["errors"] = {k: sum(r["errors"].get(k, 0) for r in runs) for r in runs for k in r["errors"]}
    return out


def sampler_ceiling(preset: str, model: str, questions: list[str], batch: int, rounds: int = 3) -> dict:
    """In-process, no HTTP: tokens/s of ``batch`` prompts decoded together vs one by one (best of rounds).

    This bounds what request batching can gain on this machine with this sampler.
    """
    import torch

    from d3core.models.checkpoint import load_pretrained
    from d3core.models.tokenizer import load_tokenizer
    from d3core.samplers import get_sampler
    from d3core.sft import encode_prompt
    from serve_apps.config import ServeConfig

    cfg = ServeConfig.from_preset(preset, **({"model": model} if model else {}))
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.torch_threads or threads)
    try:
        net = load_pretrained(cfg.model, device=cfg.device).eval()
        tok = load_tokenizer(cfg.tokenizer_uri, cfg.trust_remote_code)
        prompts = [encode_prompt(tok, q) for q in questions[:batch]]
        spec, params = get_sampler(cfg.sampler), cfg.default_params()
        best_one, best_all, tokens = float("inf"), float("inf"), 0
        for _ in range(rounds):
            t0 = time.perf_counter()
            tokens = sum(spec.generate(net, [p], params).sequences[0].num_generated for p in prompts)
            best_one = min(best_one, time.perf_counter() - t0)
            t0 = time.perf_counter()
            together = spec.generate(net, prompts, params)
            best_all = min(best_all, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return {"batch": batch, "tokens": tokens, "one_by_one_s": round(best_one, 4), "batched_s": round(best_all, 4),
            "speedup": round(best_one / best_all, 3), "batched_forwards": together.stats.get("batch_forwards"),
            "mean_nfe": round(together.total_nfe / batch, 2)}


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
            "ray": ray.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


async def drive(base: str, questions: list[str], model: str, clients: int, requests: int, seconds: float,
                timeout: float) -> dict:
    """``clients`` workers share a budget of ``requests``; stops early at ``seconds``."""
    latencies, tokens, nfe, tpf, batch = [], [], [], [], []
    errors: dict[str, int] = {}
    sent = 0
    start = time.perf_counter()
    stop_at = start + seconds

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < stop_at:
            q = questions[sent % len(questions)]
            sent += 1
            t0 = time.perf_counter()
            try:
                r = await http.post(f"{base}/v1/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": q}], "temperature": 0})
            except httpx.HTTPError as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                continue
            if r.status_code != 200:
                errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                continue
            u = r.json()["usage"]
            latencies.append(time.perf_counter() - t0)
            tokens.append(u["completion_tokens"])
            nfe.append(u["nfe"])
            tpf.append(u["tpf"])
            batch.append(u["batch_size"])

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        await asyncio.gather(*(worker(http) for _ in range(clients)))
    wall = time.perf_counter() - start
    done = len(latencies)
    return {
        "completed": done, "errors": errors, "wall_s": round(wall, 3),
        "requests_per_s": round(done / wall, 3),
        "latency_p50_s": round(percentile(latencies, 50), 4), "latency_p99_s": round(percentile(latencies, 99), 4),
        "tokens_per_s": round(sum(tokens) / wall, 2),
        "mean_completion_tokens": round(statistics.fmean(tokens), 2) if tokens else None,
        "mean_batch_size": round(statistics.fmean(batch), 2) if batch else None,
        "mean_tpf": round(statistics.fmean(tpf), 3) if tpf else None,
        "mean_nfe": round(statistics.fmean(nfe), 2) if nfe else None,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench/serve_load.json", help="JSON result path")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list from {list(SCENARIOS)}")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=96, help="requests per scenario (upper bound)")
    ap.add_argument("--seconds", type=float, default=60.0, help="time bound per scenario")
    ap.add_argument("--warmup", type=int, default=4, help="requests before each measurement")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over the scenarios; medians are reported")
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (server and client)")
    ap.add_argument("--model", default="", help="checkpoint URI (default: the preset's)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the in-process batching ceiling")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.seconds <= 0 or args.repeats < 1:
        ap.error("--clients, --requests, --seconds and --repeats must be positive")
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenarios {unknown}: choose from {list(SCENARIOS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import ray
    from ray import serve

    from d3core.eval import synthetic
    from serve_apps.openai_app import app_builder

    questions = [p.question for p in synthetic.generate("test", 64, seed=7)]
    load_before = os.getloadavg()
    ceiling = None if args.no_ceiling else sampler_ceiling(args.preset, args.model, questions, args.clients)
    if ceiling:
        logger.info("sampler ceiling: %s", json.dumps(ceiling))
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    runs: dict[str, list[dict]] = {}
    model_name = None
    try:
        for rep, name in [(r, n) for r in range(args.repeats) for n in names]:  # interleaved: drift hits all
            sc = SCENARIOS[name]
            build = {"preset": args.preset, "num_replicas": sc.num_replicas, "max_batch_size": sc.max_batch_size,
                     "request_timeout_s": args.timeout, "max_ongoing_requests": max(32, args.clients)}
            if args.model:
                build["model"] = args.model
            t0 = time.perf_counter()
            serve.run(app_builder(build), name=APP, route_prefix="/")
            model_name = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
            logger.info("%s deployed in %.1f s", name, time.perf_counter() - t0)
            asyncio.run(drive(base, questions, model_name, min(args.clients, args.warmup), args.warmup, 60,
                              args.timeout + 10))
            loadavg = os.getloadavg()
            res = asyncio.run(drive(base, questions, model_name, args.clients, args.requests, args.seconds,
                                    args.timeout + 10))
            res.update(num_replicas=sc.num_replicas, max_batch_size=sc.max_batch_size,
                       loadavg_1m_at_start=round(loadavg[0], 2), repeat=rep)
            runs.setdefault(name, []).append(res)
            logger.info("%s (repeat %d): %s", name, rep, json.dumps(res))
    finally:
        serve.shutdown()
        ray.shutdown()

    results = {name: summarize(rs) for name, rs in runs.items()}

    def ratio(a: str, b: str, key: str) -> float | None:
        if a in results and b in results and results[b][key]:
            return round(results[a][key] / results[b][key], 3)
        return None

    out = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "hardware": hardware(),
        "settings": {"clients": args.clients, "requests": args.requests, "seconds": args.seconds,
                     "num_cpus": args.num_cpus, "preset": args.preset, "model": args.model or "(preset)",
                     "served_model": model_name, "torch_threads_per_replica": 1 if args.preset == "tiny" else None,
                     "endpoint": "/v1/chat/completions, temperature 0"},
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "sampler_batching_ceiling": ceiling,
        "scenarios": results,
        "runs": runs,
        "ratios": {
            "replicas_2_vs_1_rps_batching": ratio("r2-batch", "r1-batch", "requests_per_s"),
            "replicas_2_vs_1_rps_no_batching": ratio("r2-nobatch", "r1-nobatch", "requests_per_s"),
            "batching_on_vs_off_tokens_per_s_1_replica": ratio("r1-batch", "r1-nobatch", "tokens_per_s"),
            "batching_on_vs_off_tokens_per_s_2_replicas": ratio("r2-batch", "r2-nobatch", "tokens_per_s"),
        },
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
