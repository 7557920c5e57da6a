"""Sampler benchmark on the shipped tiny teacher: accuracy, TPF and tokens/s per sampler and threshold.

    python benchmarks/samplers.py --out runs/bench/samplers.json [--n-acc 200] [--n-speed 32]

Accuracy, TPF and token-forwards per committed token (window tokens recomputed / generation
slots) come from ``--n-acc`` held-out problems decoded in batches of 100 (so they do not depend
on the batch size: every sampler gives the same tokens batched or alone); tokens/s is measured
separately on the first ``--n-speed`` problems at batch 1 and at batch 8, after one warm-up
decode. Writes one JSON file; docs/benchmarks.md records a run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time

import torch

from d3core.eval import synthetic
from d3core.eval.harness import evaluate_synthetic
from d3core.models.shipped import load_tiny_ar, load_tiny_teacher, load_tiny_tokenizer
from d3core.samplers import get_sampler
from d3core.sft import encode_prompt

logger = logging.getLogger("d3ray.bench.samplers")

SWEEP: list[tuple[str, dict]] = (
    [("vanilla", {})]
    + [("fast_dllm", {"threshold": t, "cache": c}) for c in ("none", "prefix", "dual") for t in (0.9, 0.7, 0.5)]
    + [("dparallel", {"threshold": t}) for t in (0.3, 0.5, 1.0)]
    + [("d3llm", {"threshold": t, "cache_delay_iter": d}) for d in (None, 2) for t in (0.3, 0.5, 1.0)]
    + [("d3llm", {"threshold": t, "cache_delay_iter": 2, "window": "blocks"}) for t in (0.3, 0.5, 1.0)]
    + [("apd", {"mixture_weight": r, "kv_window": 16}) for r in (0.5, 0.7)]
    + [("ar", {})]
)


def speed(spec, model, prompts, params, batch_size, extra) -> dict:
    spec.generate(model, prompts[:batch_size], params, **extra)  # warm-up
    generated = nfe = 0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        res = spec.generate(model, prompts[i:i + batch_size], params, **extra)
        generated += sum(s.num_generated for s in res.sequences)
        nfe += res.total_nfe
    wall = time.perf_counter() - t0
    return {"tokens_per_second": generated / wall, "wall_s": wall, "tpf": generated / nfe}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/bench/samplers.json")
    parser.add_argument("--n-acc", type=int, default=200)
    parser.add_argument("--n-speed", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated sampler names to run (default: all)")
    parser.add_argument("--device", default="cpu", help="torch device for the models, e.g. cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    teacher, ar_model = load_tiny_teacher(device=args.device), load_tiny_ar(device=args.device)
    tok = load_tiny_tokenizer()
    problems = synthetic.generate("test", args.n_acc, seed=0)
    speed_prompts = [encode_prompt(tok, p.question) for p in problems[: args.n_speed]]
    only = set(filter(None, args.only.split(",")))
    rows = []
    for name, kwargs in SWEEP:
        if only and name not in only:
            continue
        spec = get_sampler(name)
        params = spec.params_cls(**kwargs)
        model = ar_model if spec.autoregressive else teacher
        extra = {"verifier": ar_model} if spec.needs_verifier else {}
        acc = evaluate_synthetic(model, tok, name, params, problems, batch_size=100, **extra)
        row = {"sampler": name, "params": kwargs, "accuracy": acc.accuracy, "tpf": acc.tpf, "mean_nfe": acc.mean_nfe,
               "forwards_per_token": acc.forwards_per_token,
               "batch1": speed(spec, model, speed_prompts, params, 1, extra),
               "batch8": speed(spec, model, speed_prompts, params, 8, extra)}
        rows.append(row)
        logger.info("%-9s %-40s acc %.3f TPF %.2f tok/s b1 %.0f b8 %.0f", name, json.dumps(kwargs), row["accuracy"],
                    row["tpf"], row["batch1"]["tokens_per_second"], row["batch8"]["tokens_per_second"])
    out = {"hardware": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"},
           "n_acc": args.n_acc, "n_speed": args.n_speed, "gen_length": 48, "results": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
