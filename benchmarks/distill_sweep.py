"""Sweep distillation settings in single processes and score each student against the teacher.

    python benchmarks/distill_sweep.py --trajectories runs/traj --grid 'ew=4,8;steps=100,150' \\
        --thresholds 0.2,0.3,0.5 --n-eval 500 --jobs 2 --out runs/bench/distill_sweep.json

Each point of the grid trains the teacher with the distillation objective of
``pipelines/distill.py`` on one process (the same ``distill_step``, row order, noise and lr
schedule as one Ray Train worker holding the whole global batch), then decodes the held-out
synthetic split with ``d3llm`` at each threshold. The teacher is scored once at the same
thresholds. Results are written after every point, and points already in ``--out`` are
skipped, so an interrupted sweep resumes. Runs on a GPU when one is visible (``--device``).

``--students NAME=DIR,...`` scores already trained students (e.g. the ``student/`` of
``pipelines/full.py`` and a ``--masking random`` run) against the teacher instead of training.

Grid keys (``key=v1,v2;key2=...``, the product is swept; grids joined by ``|`` run in turn):
``prompts`` (use the trajectory rows of the first N prompts), ``steps``, ``lr``, ``ew`` (certainty-forcing weight),
``masking`` (trajectory / random), ``batch``, ``mr_max`` (mask-ratio ceiling), ``windows``
(e.g. ``16-32``), ``warmup``, ``seed``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger("d3ray.bench.distill_sweep")

KEYS = {"prompts": int, "steps": int, "lr": float, "ew": float, "masking": str, "batch": int, "mr_max": float,
        "windows": str, "warmup": int, "seed": int}


@dataclass(frozen=True)
class Point:
    prompts: int = 0  # 0: every trajectory row
    steps: int = 150
    lr: float = 2e-4
    ew: float = 8.0
    masking: str = "trajectory"
    batch: int = 32
    mr_max: float = 0.8
    windows: str = "16-32"
    warmup: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if self.masking not in ("trajectory", "random"):
            raise ValueError(f"masking={self.masking!r}: must be 'trajectory' or 'random'")
        if self.steps < 1 or self.batch < 1 or self.prompts < 0:
            raise ValueError(f"steps={self.steps}, batch={self.batch}, prompts={self.prompts}: steps and batch "
                             "must be >= 1, prompts >= 0")
        try:
            sizes = [int(k) for k in self.windows.split("-")]
        except ValueError:
            sizes = []
        if not sizes or min(sizes) < 1:
            raise ValueError(f"windows={self.windows!r}: give positive sizes joined by '-', e.g. 16-32")

    @property
    def name(self) -> str:
        return ",".join(f"{k}={v}" for k, v in asdict(self).items())


def parse_grid(spec: str) -> list[Point]:
    """``KEY=V1,V2;KEY2=...`` -> the product; several grids joined by ``|`` run one after another."""
    if "|" in spec:
        points = [pt for sub in spec.split("|") for pt in parse_grid(sub)]
        return list(dict.fromkeys(points))
    axes: dict[str, list] = {}
    for part in filter(None, (s.strip() for s in spec.split(";"))):
        key, sep, values = part.partition("=")
        key = key.strip()
        if not sep or key not in KEYS:
            raise ValueError(f"grid part {part!r}: expected KEY=V1,V2 with KEY one of {sorted(KEYS)}")
        axes[key] = [KEYS[key](v.strip()) for v in values.split(",") if v.strip()]
    keys = list(axes)
    return [Point(**dict(zip(keys, combo))) for combo in itertools.product(*(axes[k] for k in keys))]


def load_rows(trajectories: str) -> list[dict]:
    """Correct trajectory rows in prompt order (shards are cut by prompt order)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from d3core import trajectory as T

    manifest = T.read_manifest(trajectories)
    if manifest is None:
        raise FileNotFoundError(f"no {T.MANIFEST} under {trajectories!r}: run pipelines/trajectories.py first")
    shards = [trajectories.rstrip("/") + "/" + name for name in sorted(manifest["shards"])]
    table = pa.concat_tables([T.read_shard(trajectories, p) for p in shards])
    rows = []
    for i, rec in enumerate(table.select(["id", "prompt_ids", "response_ids", "unmask_step", "is_correct"])
                            .to_pylist()):
        rec["index"] = i
        rows.append(rec)
    logger.info("%d trajectory rows, %d correct", len(rows), int(pc.sum(table.column("is_correct")).as_py()))
    return rows


def train_point(point: Point, rows: list[dict], init: str, device: str) -> tuple[object, dict]:
    import torch

    from d3core.distill.losses import LossWeights
    from d3core.distill.objective import DistillObjective
    from d3core.models.checkpoint import load_pretrained
    from pipelines.distill_worker import distill_step, epoch_order, lr_at

    use = [r for r in rows if r["is_correct"] and (not point.prompts or r["index"] < point.prompts)]
    if len(use) < point.batch:
        raise ValueError(f"{len(use)} usable rows < batch={point.batch}: lower batch or generate more trajectories")
    objective = DistillObjective(masking=point.masking, window_sizes=tuple(int(k) for k in point.windows.split("-")),
                                 mask_ratio_max=point.mr_max, weights=LossWeights(entropy_weight=point.ew))
    torch.manual_seed(point.seed)
    model = load_pretrained(init, device=device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=point.lr, betas=(0.9, 0.95), weight_decay=0.0)
    steps_per_epoch = len(use) // point.batch
    step, epoch, t0 = 0, 0, time.perf_counter()
    last: dict = {}
    while step < point.steps:
        order = epoch_order(use, point.seed, epoch)
        for pos in range(0, steps_per_epoch * point.batch, point.batch):
            if step >= point.steps:
                break
            progress = epoch + min((step - epoch * steps_per_epoch) / max(steps_per_epoch, 1), 0.999)
            lr = lr_at(step, point.steps, point.lr, point.warmup)
            last = distill_step(model, optimizer, objective, order[pos: pos + point.batch], step, point.steps,
                                progress, point.seed, lr, 1.0)
            step += 1
        epoch += 1
    return model.eval(), {"rows": len(use), "epochs": round(point.steps / steps_per_epoch, 2),
                          "train_seconds": round(time.perf_counter() - t0, 1),
                          "final_loss": round(last.get("loss", float("nan")), 4)}


def score(model, tokenizer, thresholds: list[float], n_eval: int, cache_delay: int | None, batch_size: int) -> dict:
    import torch

    from d3core.eval import synthetic
    from d3core.eval.harness import evaluate_synthetic
    from d3core.samplers.d3llm import D3LLMParams

    problems = synthetic.generate("test", n_eval, 0)
    out = {}
    with torch.no_grad():
        for tau in thresholds:
            rep = evaluate_synthetic(model, tokenizer, "d3llm",
                                     D3LLMParams(threshold=tau, cache_delay_iter=cache_delay),
                                     problems, batch_size=batch_size)
            out[str(tau)] = {"accuracy": rep.accuracy, "tpf": round(rep.tpf, 4)}
    return out


def _job(args: tuple) -> dict:
    point, rows, opts = args
    import torch

    torch.set_num_threads(opts["threads"])
    from d3core.models.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    model, info = train_point(point, rows, opts["init"], opts["device"])
    tok = load_tokenizer(opts["init"], opts["trust_remote_code"])
    info["eval"] = score(model, tok, opts["thresholds"], opts["n_eval"], opts["cache_delay"], opts["eval_batch"])
    info["point"] = asdict(point)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trajectories", default="", help="trajectory shards to train on (not needed with --students)")
    p.add_argument("--students", default="", help="NAME=DIR,...: score these checkpoints instead of training")
    p.add_argument("--grid", default="", help="KEY=V1,V2;... (see the module doc); empty: the tiny preset alone")
    p.add_argument("--init", default="", help="teacher / student init; empty: the shipped tiny teacher")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow tokenizers defined by the checkpoint's own Python code (Dream)")
    p.add_argument("--thresholds", default="0.3,0.5")
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--cache-delay", type=int, default=1, help="d3llm cache_delay_iter; -1: no KV cache")
    p.add_argument("--eval-batch", type=int, default=128)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", default="runs/bench/distill_sweep.json")
    args = p.parse_args(argv)
    if not args.trajectories and not args.students:
        p.error("--trajectories DIR is required to train (or pass --students NAME=DIR,... to score checkpoints)")
    for name in ("n_eval", "jobs", "threads", "eval_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    try:
        thresholds = [float(t) for t in args.thresholds.split(",")]
    except ValueError:
        p.error(f"--thresholds={args.thresholds!r}: give comma-separated numbers, e.g. 0.3,0.5")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import torch

    from d3core.models.shipped import TINY_TEACHER_DIR

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    init = args.init or str(TINY_TEACHER_DIR)
    opts = dict(init=init, device=device, thresholds=thresholds,
                n_eval=args.n_eval, cache_delay=None if args.cache_delay < 0 else args.cache_delay,
                eval_batch=args.eval_batch, threads=args.threads, trust_remote_code=args.trust_remote_code)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results.setdefault("runs", {})
    results["settings"] = {k: v for k, v in opts.items() if k != "init"} | {"trajectories": args.trajectories}
    results["hardware"] = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                           "cores": os.cpu_count(), "torch": torch.__version__}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(out)

    torch.set_num_threads(args.threads)
    if "teacher" not in results:
        from d3core.models.checkpoint import load_pretrained
        from d3core.models.tokenizer import load_tokenizer

        teacher = load_pretrained(init, device=device).eval()
        results["teacher"] = score(teacher, load_tokenizer(init, args.trust_remote_code), opts["thresholds"],
                                   args.n_eval, opts["cache_delay"], args.eval_batch)
        save()
    logger.info("teacher: %s", results["teacher"])

    if args.students:
        from d3core.models.checkpoint import load_pretrained
        from d3core.models.tokenizer import load_tokenizer

        results.setdefault("students", {})
        for item in filter(None, args.students.split(",")):
            name, sep, path = item.partition("=")
            if not sep:
                raise ValueError(f"--students item {item!r}: expected NAME=DIR")
            student = load_pretrained(path, device=device).eval()
            ev = score(student, load_tokenizer(path, args.trust_remote_code), opts["thresholds"], args.n_eval,
                       opts["cache_delay"], args.eval_batch)
            results["students"][name] = {"path": path, "eval": ev}
            save()
            _record(results, {"point": None, "name": name, "seconds": 0, "eval": ev})
        return
    rows = load_rows(args.trajectories)
    points = [pt for pt in (parse_grid(args.grid) or [Point()]) if pt.name not in results["runs"]]
    logger.info("%d points to run on %s with %d jobs", len(points), device, args.jobs)
    jobs = [(pt, rows, opts) for pt in points]
    if args.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for info in pool.imap_unordered(_job, jobs):
                _record(results, info)
                save()
    else:
        for job in jobs:
            _record(results, _job(job))
            save()


def _record(results: dict, info: dict) -> None:
    if info["point"] is None:
        name = info["name"]
    else:
        name = Point(**info["point"]).name
        results["runs"][name] = info
    teacher = results["teacher"]
    cells = " ".join(f"tau {t}: {e['accuracy']:.3f}@{e['tpf']:.2f} ({e['tpf'] / teacher[t]['tpf']:.2f}x, "
                     f"{100 * (e['accuracy'] - teacher[t]['accuracy']):+.1f}pt)" for t, e in info["eval"].items())
    logger.info("%s [%ss]: %s", name, info["seconds"], cells)


if __name__ == "__main__":
    main()
