"""The windowed ``d3llm`` against the reference, on the tiny models: accuracy, TPF, token-forwards per committed
token and AUP, at the trained generation length and at the longest canvas the tiny model allows.

    python benchmarks/window_eval.py --out runs/bench/window_eval.json                       # the teacher
    python benchmarks/window_eval.py --model runs/full/student --out ...                     # saved students
    python benchmarks/window_eval.py --trajectories runs/traj --seeds 0,1,2 --out ...        # students trained here

``--trajectories`` trains one student per ``--seeds`` value in this process with the main job's
distillation settings (the tiny preset: 350 steps, certainty-forcing weight 12, windows 16-48, mask
ratio up to 1; ``benchmarks/distill_sweep.py``'s ``train_point``, the pipeline's ``distill_step``) and
scores each.

Systems (cache delay 2, block 16, batch 50, 500 held-out synthetic problems by default):

* ``d3llm`` reference (``window="canvas"``) and windowed (``window="blocks"`` with the suffix read from the
  cache, or dropped, and a lookahead of 0 or 1 block);
* ``fast_dllm`` dual (confidence thresholds 0.9 and 0.7) and ``dparallel`` (entropy thresholds), for scale.

Entropy thresholds 0.3 and 0.5. Token-forwards per committed token = the window tokens recomputed over
all steps / the generation slots (each committed once). AUP per system over its thresholds, with the
task's y_max over every system at that length (d3core/eval/aup.py). Writes one JSON.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is no package: bench_json by name
from bench_json import write_json  # noqa: E402

logger = logging.getLogger("d3ray.bench.window_eval")

THRESHOLDS = (0.3, 0.5)
SYSTEMS: dict[str, tuple[str, dict]] = {
    "d3llm-reference": ("d3llm", {"cache_delay_iter": 2}),
    "d3llm-blocks-cache": ("d3llm", {"cache_delay_iter": 2, "window": "blocks", "suffix": "cache"}),
    "d3llm-blocks-cache-la1": ("d3llm", {"cache_delay_iter": 2, "window": "blocks", "suffix": "cache", "lookahead": 1}),
    "d3llm-blocks-drop": ("d3llm", {"cache_delay_iter": 2, "window": "blocks", "suffix": "drop"}),
    "fast_dllm-dual": ("fast_dllm", {"cache": "dual"}),
    "dparallel": ("dparallel", {}),
}


def trained_students(trajectories: str, seeds: list[int]):
    """``(name, student)`` per seed, trained with the tiny preset's distillation settings, one at a time."""
    from distill_sweep import Point, load_rows, train_point

    from d3core.models.shipped import TINY_TEACHER_DIR

    rows = load_rows(trajectories)
    for seed in seeds:
        point = Point(steps=350, ew=12.0, mr_max=1.0, windows="16-48", seed=seed)
        model, info = train_point(point, rows, str(TINY_TEACHER_DIR), "cpu")
        logger.info("student seed %d trained: %s", seed, info)
        yield f"student-seed{seed}", model


def longest_canvas(model, prompts: list[list[int]], block: int) -> int:
    """The longest generation length (a multiple of ``block``) that fits every prompt in the model's context."""
    room = model.config.max_seq_len - max(len(p) for p in prompts)
    return room // block * block


def evaluate(model, tok, problems, gen: int, batch: int) -> list[dict]:
    from d3core.eval.harness import evaluate_synthetic
    from d3core.samplers import get_sampler

    rows = []
    for system, (sampler, kw) in SYSTEMS.items():
        for threshold in THRESHOLDS:
            if sampler == "fast_dllm":
                threshold = {0.3: 0.9, 0.5: 0.7}[threshold]  # a confidence, not an entropy
            params = get_sampler(sampler).params_cls(gen_length=gen, block_length=16, threshold=threshold, **kw)
            t0 = time.perf_counter()
            report = evaluate_synthetic(model, tok, sampler, params, problems, batch_size=batch)
            rows.append({"system": system, "sampler": sampler, "gen_length": gen, "threshold": threshold,
                         "accuracy": 100 * report.accuracy, "tpf": report.tpf,
                         "forwards_per_token": report.forwards_per_token, "wall_s": time.perf_counter() - t0})
            logger.info("gen %d %-24s thr %.1f: acc %.1f TPF %.2f fwd/tok %.2f", gen, system, threshold,
                        rows[-1]["accuracy"], report.tpf, report.forwards_per_token)
    return rows


def with_aup(rows: list[dict]) -> dict:
    from d3core.eval.aup import aup_by_system

    out = {}
    for gen in sorted({r["gen_length"] for r in rows}):
        cell = [r for r in rows if r["gen_length"] == gen]
        systems = {s: [(r["tpf"], r["accuracy"]) for r in cell if r["system"] == s] for s in SYSTEMS}
        out[str(gen)] = aup_by_system(systems)
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench/window_eval.json")
    parser.add_argument("--model", action="append", default=[], help="a model directory (default: the tiny teacher)")
    parser.add_argument("--trajectories", default="", help="train students from these trajectories (see --seeds)")
    parser.add_argument("--seeds", default="0,1,2", help="distillation seeds of the students --trajectories trains")
    parser.add_argument("--n", type=int, default=500, help="held-out problems")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.n < 1 or args.batch < 1 or args.threads < 1:
        parser.error(f"--n {args.n}, --batch {args.batch}, --threads {args.threads}: each must be >= 1")
    import torch

    from d3core.eval import synthetic
    from d3core.models.checkpoint import load_pretrained
    from d3core.models.shipped import load_tiny_teacher, load_tiny_tokenizer
    from d3core.sft import encode_prompt

    torch.set_num_threads(args.threads)
    tok = load_tiny_tokenizer()
    problems = synthetic.generate("test", args.n, seed=0)
    prompts = [encode_prompt(tok, p.question) for p in problems]
    models = [(m, load_pretrained(m).eval()) for m in args.model]
    if args.trajectories:
        models += list(trained_students(args.trajectories, [int(s) for s in args.seeds.split(",") if s]))
    if not models:
        models = [("teacher", load_tiny_teacher())]
    out = {"n": args.n, "thresholds": THRESHOLDS, "systems": SYSTEMS, "models": {}}
    for name, model in models:
        gens = (48, longest_canvas(model, prompts, 16))
        rows = [r for gen in gens for r in evaluate(model, tok, problems, gen, args.batch)]
        out["models"][name] = {"rows": rows, "aup": with_aup(rows)}
        logger.info("%s AUP %s", name, out["models"][name]["aup"])
    write_json(args.out, out)


if __name__ == "__main__":
    main()
