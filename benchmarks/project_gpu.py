"""A roofline projection of decode throughput on an H100 and an H200, labelled as one (no GPU is used).

    python benchmarks/dry_run.py --out runs/bench/dry_run.json        # device costs per step (fake CUDA)
    python benchmarks/project_gpu.py --dry-run runs/bench/dry_run.json --out runs/bench/project_gpu.json

Per sampler and batch size of the dry run (LLaDA-8B shape, prompt 256, gen 256, block 32, scripted
9 commits per row per step), the projected step is

    step = host time per step (measured here, d3core/perf/hosttime.py: the engine's planning, packing
           and applying with a device part that costs nothing)
         + device time per step, as the larger of compute and memory time:
           * step roofline: max(FLOPs / peak, fused bytes / bandwidth) (weights, KV and logits moved once);
           * op roofline: the sum over the step's kernels of max(FLOPs / peak, bytes / bandwidth) (eager
             kernels replayed back to back from a CUDA graph, no fusion).

The host part cannot overlap the device part: the next step's plan needs this step's decisions.
Tokens/s = tokens committed per step / step time. Published anchors, for scale: d3LLM-LLaDA through
SGLang 545 tok/s on an H100 at batch 1, d3LLM's Hugging Face code 288.89 tok/s, dInfer above 1,100 tok/s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is no package: bench_json by name
from bench_json import write_json  # noqa: E402

logger = logging.getLogger("d3ray.bench.project_gpu")

ANCHORS = {"sglang_d3llm_llada_h100_batch1": 545.0, "d3llm_hf_code": 288.89, "dinfer_batch1_above": 1100.0}


def host_times(samplers: list[str], batches: list[int], repeats: int) -> dict[tuple[str, int], float]:
    import torch

    from benchmarks.dry_run import _params, _program
    from d3core.perf.hosttime import host_ms_per_step, zero_cost_model

    torch.set_num_threads(1)
    model = zero_cost_model("llada", "llada-8b")
    out = {}
    for sampler in samplers:
        for batch in batches:
            row = host_ms_per_step(model, _program(sampler), _params(sampler), batch, 256, 9, repeats)
            out[(sampler, batch)] = row["host_ms_per_step"]
            logger.info("host %s batch %d: %.3f ms/step", sampler, batch, row["host_ms_per_step"])
    return out


def project(decode_rows: list[dict], host: dict[tuple[str, int], float]) -> list[dict]:
    out = []
    for row in decode_rows:
        if row["arch"] != "llada":
            continue
        host_ms = host[(row["case"], row["batch"])]
        committed_per_step = row["committed"] / row["steps"]
        item = {"sampler": row["case"], "batch": row["batch"], "tpf": row["tpf"], "host_ms": host_ms,
                "token_forwards_per_committed_token": row["token_forwards_per_committed_token"]}
        for device in ("h100", "h200"):
            dev = row[device]
            for kind in ("step", "op"):
                step_ms = host_ms + dev[f"{kind}_roofline_ms"]
                item[f"{device}_{kind}_ms"] = step_ms
                item[f"{device}_{kind}_tokens_per_s"] = committed_per_step / step_ms * 1e3
            item[f"{device}_weight_floor_ms"] = dev["weight_floor_ms"]
            item[f"{device}_compute_ms"] = dev["compute_ms"]
            item[f"{device}_memory_ms"] = dev["memory_ms"]
        out.append(item)
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", required=True, action="append",
                        help="a JSON of benchmarks/dry_run.py (repeat to merge runs)")
    parser.add_argument("--out", default="runs/bench/project_gpu.json")
    parser.add_argument("--repeats", type=int, default=3, help="host-time decodes per cell (median)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be >= 1")
    rows, layers = [], set()
    for path in args.dry_run:
        if not os.path.exists(path):
            parser.error(f"--dry-run {path}: no such file; run benchmarks/dry_run.py first")
        with open(path) as f:
            dry = json.load(f)
        rows += [r for r in dry["decode"] if r["arch"] == "llada" and r["case"] in ("d3llm", "d3llm-blocks",
                                                                                     "fast_dllm")]
        layers.add(str(dry["layers"]))
    if len(layers) > 1:
        parser.error(f"--dry-run files of different layer counts {sorted(layers)}: project one shape at a time")
    host = host_times(sorted({r["case"] for r in rows}), sorted({r["batch"] for r in rows} | {64}), args.repeats)
    out = {"note": "a roofline projection from fake-tensor dry runs and published figures, not a measurement",
           "dry_run": args.dry_run, "layers": layers.pop(), "anchors_tokens_per_s": ANCHORS,
           "host_ms_per_step": {f"{s}/{b}": v for (s, b), v in host.items()},
           "projection": project(rows, host)}
    write_json(args.out, out)
    for item in out["projection"]:
        logger.info("%s batch %d: H100 %.0f-%.0f tok/s, H200 %.0f-%.0f tok/s (op-step rooflines, host %.2f ms)",
                    item["sampler"], item["batch"], item["h100_op_tokens_per_s"], item["h100_step_tokens_per_s"],
                    item["h200_op_tokens_per_s"], item["h200_step_tokens_per_s"], item["host_ms"])


if __name__ == "__main__":
    main()
