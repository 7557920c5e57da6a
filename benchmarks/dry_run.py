"""Dry runs at real 8B shape on fake CUDA tensors, on a CPU-only machine: memory, FLOPs and bytes per step.

    python benchmarks/dry_run.py --out runs/bench/dry_run.json            # the whole table (~25 min on 2 cores)
    python benchmarks/dry_run.py --layers 2 --quick --out /tmp/dry.json   # a smoke run (~1 min)

Cases (d3core/perf/dryrun.py; LLaDA-8B-Instruct and Dream-7B-Instruct configs, all layers, bf16,
real vocabularies; prompt 256, gen 256, block 32, scripted 9 commits per row per step):

* ``d3llm`` (cache delay 1) and ``fast_dllm`` dual through the engine at batch 1, 8, 32 (and 64 for LLaDA);
  LLaDA's ``d3llm`` sampling at temperature 0.8 at batch 8 and 32 (float64 Gumbel noise per logit);
* the serving engine's decoder with mixed rows: the llada-8b serve recipe's 32 rows and 2,048-slot
  capacity, requests of 64-512 prompt tokens joining every other step, with mixed thresholds;
* one distillation step per FSDP2 shard at 8 workers (pipelines/distill_dryrun.py) at 1-8 rows per worker.

For every case: peak memory against 80 GB (H100) and 141 GB (H200), the devices the tensors lived on,
FLOPs and bytes (weights, KV, logits, activations) per step, and both rooflines (d3core/perf/costs.py).
The largest batch that fits comes from a line through the batch-8 and batch-32 peaks (all per-row
memory scales with the rows), checked by a dry run at that batch for LLaDA's d3llm on the H100.
Every time figure here is a projection from published device figures, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is no package: bench_json by name
from bench_json import write_json  # noqa: E402

logger = logging.getLogger("d3ray.bench.dry_run")

MODELS = {"llada": "llada-8b", "dream": "dream-7b"}


def _params(sampler: str, temperature: float = 0.0):
    from d3core.samplers.d3llm import D3LLMParams
    from d3core.samplers.fast_dllm import FastDLLMParams

    if sampler.startswith("d3llm"):  # d3llm: the reference window; d3llm-blocks: the in-flight blocks only
        window = {"window": "blocks", "suffix": "drop"} if sampler == "d3llm-blocks" else {}
        return D3LLMParams(gen_length=256, block_length=32, threshold=0.5, cache_delay_iter=1, early_stop=False,
                           temperature=temperature, **window)
    return FastDLLMParams(gen_length=256, block_length=32, threshold=0.9, cache="dual", early_stop=False)


def _program(sampler: str):
    from d3core.samplers.d3llm import D3LLMProgram
    from d3core.samplers.fast_dllm import FastDLLMProgram

    return D3LLMProgram() if sampler.startswith("d3llm") else FastDLLMProgram()


def decode_case(arch: str, sampler: str, batch: int, layers: int | None, prompt: int = 256, tpf: int = 9,
                temperature: float = 0.0) -> dict:
    from d3core.perf.dryrun import dry_decode

    prompts = np.random.default_rng(batch).integers(0, 100_000, (batch, prompt)).tolist()
    name = sampler if temperature == 0 else f"{sampler}-sampled"
    result = dry_decode(name, arch, MODELS[arch], _program(sampler), _params(sampler, temperature), prompts, tpf,
                        layers=layers)
    row = result.summary()
    logger.info("%s %s batch %d: peak %.1f GB, %.0f GFLOP/step, H100 op roofline %.2f ms (%.0f s)", arch, sampler,
                batch, row["peak_gb"], row["gflops_per_step"], row["h100"]["op_roofline_ms"], row["dry_run_wall_s"])
    return row


def serving_case(layers: int | None, requests: int, rows: int = 32, capacity: int = 2048) -> dict:
    """The serve recipe's decoder (rows, capacity) with requests of mixed prompt lengths and thresholds joining."""
    from d3core.perf.dryrun import dry_decode
    from d3core.samplers.d3llm import D3LLMParams, D3LLMProgram

    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 100_000, (64, 128, 256, 512)[i % 4]).tolist() for i in range(requests)]
    params = [D3LLMParams(gen_length=256, block_length=32, threshold=(0.3, 0.5)[i % 2], cache_delay_iter=2,
                          refresh_interval=32, early_stop=False) for i in range(requests)]
    result = dry_decode("serving", "llada", "llada-8b", D3LLMProgram(), params, prompts, tpf=9,
                        joins=[2 * i for i in range(requests)], rows=rows, capacity=capacity, layers=layers)
    row = result.summary()
    row.update(rows=rows, capacity=capacity, requests=requests, max_rows_in_a_step=max(s.rows for s in result.steps))
    logger.info("serving: peak %.1f GB, up to %d rows in a step", row["peak_gb"], row["max_rows_in_a_step"])
    return row


def largest_batch(rows: list[dict], budget: dict[str, float]) -> dict[str, int]:
    """The batch at which a line through the batch-8 and batch-32 peaks reaches each device's usable memory."""
    by_batch = {r["batch"]: r["peak_gb"] * 1e9 for r in rows}
    slope = (by_batch[32] - by_batch[8]) / 24
    base = by_batch[8] - 8 * slope
    return {name: max(int(math.floor((cap - base) / slope)), 0) for name, cap in budget.items()}


def distill_rows(layers: int | None, rows: tuple[int, ...]) -> list[dict]:
    """One FSDP2 step per shard at 8 workers, in a subprocess each (a fake process group per process)."""
    import subprocess

    out = []
    for arch in MODELS:
        for n in rows:
            code = ("import json,sys; from pipelines.distill_dryrun import dry_distill_step; "
                    f"print(json.dumps(dry_distill_step({arch!r}, {MODELS[arch]!r}, rows_per_worker={n}, "
                    f"num_layers={layers!r})))")
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  cwd=Path(__file__).resolve().parent.parent, timeout=1800)
            if proc.returncode:
                raise RuntimeError(f"distill dry run {arch} rows={n} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["peak_gb"] = row["peak_bytes"]["Total"] / 1e9
            out.append(row)
            logger.info("distill %s rows/worker %d: peak %.1f GB, %.1f TFLOP/worker", arch, n, row["peak_gb"],
                        row["tflops_per_worker"])
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench/dry_run.json")
    parser.add_argument("--layers", type=int, default=0, help="layers of every model (0: the official count)")
    parser.add_argument("--quick", action="store_true", help="LLaDA only, batch 1 and 8 (and 32 for the fit)")
    parser.add_argument("--samplers", default="d3llm,fast_dllm",
                        help="decode cases: d3llm (reference window), d3llm-blocks (windowed), fast_dllm (dual)")
    parser.add_argument("--decode-only", action="store_true", help="skip the serving and distillation cases")
    args = parser.parse_args()
    if args.layers < 0:
        parser.error(f"--layers {args.layers}: must be >= 0 (0 keeps the official layer count)")
    from d3core.perf.devices import DEVICES, USABLE_FRACTION

    layers = args.layers or None
    budget = {name: dev.memory * USABLE_FRACTION for name, dev in DEVICES.items()}
    t0 = time.perf_counter()
    out: dict = {"note": "projections from fake-tensor dry runs and published device figures, not measurements",
                 "devices": {k: vars(v) for k, v in DEVICES.items()}, "usable_fraction": USABLE_FRACTION,
                 "layers": layers or "official", "decode": [], "largest_batch": {}}
    samplers = [s for s in args.samplers.split(",") if s]
    unknown = set(samplers) - {"d3llm", "d3llm-blocks", "fast_dllm"}
    if unknown:
        parser.error(f"--samplers {args.samplers}: unknown {sorted(unknown)}; use d3llm, d3llm-blocks, fast_dllm")
    archs = ("llada",) if args.quick else tuple(MODELS)
    for arch in archs:
        for sampler in samplers:
            batches = (1, 8, 32) if args.quick or arch == "dream" else (1, 8, 32, 64)
            if args.quick and sampler == "fast_dllm":
                batches = (1,)
            rows = [decode_case(arch, sampler, b, layers) for b in batches]
            out["decode"] += rows
            if 8 in batches and 32 in batches:
                out["largest_batch"][f"{arch}/{sampler}"] = largest_batch(rows, budget)
    fit = out["largest_batch"].get("llada/d3llm", {}).get("h100")
    if fit and not args.quick and not args.decode_only:
        check = decode_case("llada", "d3llm", fit, layers)
        out["largest_batch_check"] = {"batch": fit, "peak_gb": check["peak_gb"],
                                      "fits_h100": check["peak_gb"] * 1e9 <= budget["h100"]}
    if not args.quick and not args.decode_only:  # sampling: float64 Gumbel noise over (cells, vocab)
        out["decode"] += [decode_case("llada", "d3llm", b, layers, temperature=0.8) for b in (8, 32)]
    if not args.decode_only:
        out["serving"] = serving_case(layers, requests=8 if args.quick else 16)
        out["distill"] = distill_rows(layers, (1, 2) if args.quick else (1, 2, 4, 8))
    out["wall_s"] = time.perf_counter() - t0
    write_json(args.out, out)


if __name__ == "__main__":
    main()
