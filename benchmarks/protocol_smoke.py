"""GSM8K / MATH-500 / HumanEval / MBPP through the peers' protocols on the tiny models: does the path run?

    python benchmarks/protocol_smoke.py --n 5 --out runs/bench/protocol_smoke.json

The tiny teacher (LLaDA layout: the ``llada`` protocols) and the tiny AR model (the ``ar-llada``
protocols) know only the synthetic task and have a 128-token context, so prompts are cut on the
left and the scores are near zero. Prints one line per (task, system) and writes the records.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from collections import Counter

logger = logging.getLogger("d3ray.bench.protocol_smoke")

TASKS = ("gsm8k", "math500", "humaneval", "mbpp")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--gen-length", type=int, default=16)
    parser.add_argument("--out", default="runs/bench/protocol_smoke.json")
    args = parser.parse_args()

    import torch

    from d3core.eval.harness import evaluate_task
    from d3core.eval.protocols import get_protocol
    from d3core.eval.records import run_metadata
    from d3core.eval.stats import bootstrap_ci
    from d3core.eval.tasks import get_task
    from d3core.models.shipped import load_tiny_ar, load_tiny_teacher, load_tiny_tokenizer
    from d3core.samplers import get_sampler

    torch.set_num_threads(1)
    tok = load_tiny_tokenizer()
    systems = {"teacher/d3llm": (load_tiny_teacher(), "d3llm", "llada",
                                 dict(threshold=0.5, gen_length=args.gen_length, block_length=args.gen_length)),
               "AR/ar": (load_tiny_ar(), "ar", "ar-llada", dict(gen_length=args.gen_length))}
    rows = []
    print("| task | system | protocol (peer task, shots, prompt) | accuracy [95% CI] | TPF | prompts cut | verdicts |")
    print("|---|---|---|---|---|---|---|")
    for task_name in TASKS:
        task = get_task(task_name)
        for system, (model, sampler, family, kwargs) in systems.items():
            protocol = get_protocol(family, task_name)
            spec = get_sampler(sampler)
            t0 = time.perf_counter()
            rep = evaluate_task(model, tok, task, spec, spec.params_cls(**kwargs), task.examples(args.n),
                                batch_size=args.n, generator=torch.Generator().manual_seed(0), protocol=protocol,
                                truncate_prompts=True)
            lo, hi = bootstrap_ci(rep.correct)
            verdicts = Counter(r.verdict["status"] for r in rep.samples if r.verdict) if task.code else {}
            print(f"| {task_name} | {system} | {family}: {protocol.peer_task}, {protocol.fewshot}-shot, "
                  f"{protocol.style}{', sanitize' if protocol.sanitize else ''} | {100 * rep.accuracy:.0f}% "
                  f"[{100 * lo:.0f}, {100 * hi:.0f}] | {rep.tpf:.2f} | {rep.truncated_prompts}/{rep.n} | "
                  f"{dict(verdicts) or '-'} |")
            rows.append({"task": task_name, "system": system, **rep.summary(), "seconds": time.perf_counter() - t0,
                         "samples": [dataclasses.asdict(r) for r in rep.samples]})
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"meta": run_metadata({"generator": 0}), "rows": rows}, f, indent=1)
    logger.warning("wrote %s", args.out)


if __name__ == "__main__":
    main()
