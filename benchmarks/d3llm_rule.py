"""Accuracy, TPF and AUP of ``d3llm`` on the shipped tiny teacher, this tree against another commit.

    python benchmarks/d3llm_rule.py --ref c4a9ff9 --out runs/bench/d3llm_rule.json [--n 500]

Sweeps the entropy threshold with and without the delayed cache on ``--n`` held-out problems
(batches of 100; every sampler gives the same tokens batched or alone) in this tree and in
``--ref`` (exported with ``git archive`` and run in its own process), and scores each curve with
AUP (d3LLM's definition; ``y_max`` is the best accuracy of any point in the run). Used to record
what the reference's LLaDA commit rule changed (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile

logger = logging.getLogger("d3ray.bench.d3llm_rule")

THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 1.0, 1.5)
CACHES = (None, 1)


def worker(n: int) -> list[dict]:
    import torch

    from d3core.eval import synthetic
    from d3core.eval.harness import evaluate_synthetic
    from d3core.models.shipped import load_tiny_teacher, load_tiny_tokenizer
    from d3core.samplers.d3llm import D3LLMParams

    torch.set_num_threads(1)
    teacher, tok = load_tiny_teacher(), load_tiny_tokenizer()
    problems = synthetic.generate("test", n, seed=0)
    rows = []
    for cache in CACHES:
        for tau in THRESHOLDS:
            rep = evaluate_synthetic(teacher, tok, "d3llm", D3LLMParams(threshold=tau, cache_delay_iter=cache),
                                     problems, batch_size=100)
            rows.append({"threshold": tau, "cache_delay_iter": cache, "accuracy": rep.accuracy, "tpf": rep.tpf,
                         "mean_nfe": rep.mean_nfe})
            logger.info("cache %s tau %.1f: acc %.3f TPF %.2f", cache, tau, rep.accuracy, rep.tpf)
    return rows


def _run(root: str, n: int) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", path, "--n", str(n)], cwd=root,
                   env=dict(os.environ, PYTHONPATH=root), check=True)
    with open(path) as f:
        return json.load(f)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", required=False, default="", help="git commit to compare with")
    parser.add_argument("--out", default="runs/bench/d3llm_rule.json")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.n < 1:
        parser.error(f"--n={args.n}: must be >= 1")
    if args.worker:
        with open(args.worker, "w") as f:
            json.dump(worker(args.n), f)
        return
    from d3core.eval.aup import aup

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"this": here}
    if args.ref:
        root = tempfile.mkdtemp(prefix=f"d3ray-{args.ref[:8]}-")
        archive = subprocess.run(["git", "archive", args.ref], capture_output=True, check=True, cwd=here).stdout
        subprocess.run(["tar", "-x", "-C", root], input=archive, check=True)
        trees["ref"] = root
    results = {name: _run(root, args.n) for name, root in trees.items()}
    y_max = 100 * max(r["accuracy"] for rows in results.values() for r in rows)
    summary = {}
    for name, rows in results.items():
        for cache in CACHES:
            points = [(r["tpf"], 100 * r["accuracy"]) for r in rows if r["cache_delay_iter"] == cache]
            summary[f"{name}/cache={cache}"] = aup(points, y_max)
    out = {"n": args.n, "ref": args.ref, "y_max": y_max, "aup": summary, "results": results}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    for key, value in summary.items():
        logger.info("AUP %-22s %.1f", key, value)
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
