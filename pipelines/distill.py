"""Distil a fast student from teacher trajectories on Ray Train with FSDP2.

    python pipelines/distill.py --trajectories runs/traj --out runs/student
    python pipelines/distill.py --preset llada-8b --trajectories s3://b/traj --out s3://b/student

The Parquet shards written by ``pipelines/trajectories.py`` are validated, read through Ray
Data and split over the workers (``get_dataset_shard``). Each worker runs the student under
FSDP2 (``fully_shard`` per transformer block, then the root; bf16 params with fp32 reduction
on GPU, gloo on CPU) and optimises d3LLM pseudo-trajectory distillation with dParallel's
certainty forcing (``d3core.distill``); ``--masking random`` is the plain dParallel fallback.
Checkpoints are sharded with ``torch.distributed.checkpoint`` (``pipelines/train_checkpoint.py``)
and go through ``ray.train.report``; rerunning with the same ``--out`` resumes from the latest
one (with any number of workers), and ``FailureConfig`` restarts lost workers from it. Ray
Train's storage defaults to ``<dir of OUT>/_train/<name of OUT>``, outside the export. The
student is exported to ``--out`` shard by shard from the last checkpoint, in its teacher's
layout and the preset's dtype (``d3core/models/export.py``: teacher config and ``auto_map``,
tokenizer files copied verbatim, model card), with ``distill_summary.json`` written last: its
presence marks the stage as done. ``--push-to-hub REPO`` then uploads the directory.
A teacher whose tokenizer is remote code (Dream) needs ``--trust-remote-code``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import fsspec

logger = logging.getLogger("d3ray.distill")

SUMMARY = "distill_summary.json"

PRESETS: dict[str, dict] = {
    # tiny: chosen by a sweep and measured on 2 CPU cores (docs/benchmarks.md); certainty forcing weighted
    # up (6 vs 2) because the tiny teacher starts far less certain than an 8B one, and the window grows
    # to the whole 48-slot response. 5 epochs ~ the 350 steps the main job runs on 3000 prompts' rows.
    # 8B presets follow d3LLM's recipe.
    # export_dtype: the published student's weights (bf16 like the official 8B/7B checkpoints on GPU presets).
    "tiny": dict(num_workers=2, use_gpu=False, threads_per_worker=1, batch_size=32, epochs=5, lr=2e-4,
                 warmup_steps=20, window_sizes=(16, 48), ckpt_every=50, entropy_weight=6.0, export_dtype="float32"),
    "llada-8b": dict(num_workers=8, use_gpu=True, threads_per_worker=8, batch_size=64, epochs=3, lr=2e-5,
                     warmup_steps=50, window_sizes=(32, 64), ckpt_every=200, entropy_weight=2.0,
                     export_dtype="bfloat16"),
    "dream-7b": dict(num_workers=8, use_gpu=True, threads_per_worker=8, batch_size=64, epochs=3, lr=2e-5,
                     warmup_steps=50, window_sizes=(32, 64), ckpt_every=200, entropy_weight=2.0,
                     export_dtype="bfloat16"),
}
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class DistillConfig:
    trajectories: str = "runs/trajectories"
    out: str = "runs/student"
    preset: str = "tiny"
    init: str = ""  # student initialisation (a dLLM checkpoint: path, URI, hub id); empty: the trajectories' teacher
    storage: str = ""  # Ray Train storage (local path or s3:// / gs://); empty: <dir of OUT>/_train/<name> (local)
    trust_remote_code: bool = False  # the teacher's tokenizer is Python shipped with it (Dream): allow it
    export_dtype: str = ""  # dtype of the exported weights; empty: the preset's
    max_shard_bytes: int = 5 * 10**9  # export: shard the safetensors above this size (transformers' "5GB")
    push_to_hub: str = ""  # after the export, upload it to this hub model repo (ORG/NAME)
    masking: str = "trajectory"  # or "random" (dParallel fallback)
    only_correct: bool = True
    num_workers: int = 0  # 0 / -1 / (): the preset's value
    use_gpu: bool | None = None
    threads_per_worker: int = 0
    batch_size: int = 0
    epochs: int = 0
    max_steps: int = 0  # 0: epochs * steps per epoch
    lr: float = 0.0
    warmup_steps: int = -1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    window_sizes: tuple[int, ...] = ()
    mask_ratio_min: float = 0.0
    mask_ratio_max: float = 0.8
    entropy_weight: float = -1.0  # -1: the preset's value
    entropy_temperature: float = 0.5
    ckpt_every: int = 0
    lora_rank: int = 0  # 0: full fine-tuning; > 0: peft LoRA on lora_targets, merged on export
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    max_failures: int = 2
    seed: int = 0
    fault_at_step: int = -1  # tests: one worker exits hard once at this step
    fault_marker: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r}: must be one of {sorted(PRESETS)}")
        for name, default in PRESETS[self.preset].items():
            value = getattr(self, name)
            if name == "use_gpu":
                unset = value is None
            elif name == "export_dtype":
                unset = value == ""
            elif name == "entropy_weight":
                unset = value == -1.0
            else:
                unset = value in (0, -1, ())
            if unset:
                object.__setattr__(self, name, default)
        object.__setattr__(self, "window_sizes", tuple(int(k) for k in self.window_sizes))
        if self.export_dtype not in EXPORT_DTYPES:
            raise ValueError(f"export_dtype={self.export_dtype!r}: must be one of {EXPORT_DTYPES}")
        if self.max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes={self.max_shard_bytes}: must be >= 1")
        if self.push_to_hub:
            from d3core.models.hub import HubRef

            HubRef(self.push_to_hub)  # ORG/NAME or a ValueError naming the form
            if "://" in self.out and not self.out.startswith("file://"):
                raise ValueError(f"push_to_hub={self.push_to_hub!r} uploads a local export, but out={self.out!r} "
                                 "is remote: export locally, or upload with `hf upload` from a copy")
        if self.masking not in ("trajectory", "random"):
            raise ValueError(f"masking={self.masking!r}: must be 'trajectory' or 'random'")
        for name in ("num_workers", "threads_per_worker", "batch_size", "epochs", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by num_workers={self.num_workers}: "
                             "the global batch is split evenly over the workers")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank={self.lora_rank}: must be >= 0 (0 = no LoRA)")
        if self.lora_rank:
            from d3core.distill.lora import LoraSettings

            LoraSettings(self.lora_rank, self.lora_alpha, tuple(self.lora_targets))
        if self.entropy_weight < 0:
            raise ValueError(f"entropy_weight={self.entropy_weight}: must be >= 0 (0 turns certainty forcing off)")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr={self.lr}: must lie in (0, 1)")
        if self.max_steps < 0 or self.warmup_steps < 0:
            raise ValueError(f"max_steps={self.max_steps}, warmup_steps={self.warmup_steps}: must be >= 0")
        if not self.storage and "://" in self.out and not self.out.startswith("file://"):
            raise ValueError(f"out={self.out!r} is remote: pass --storage (a local path, s3:// or gs:// URI) for "
                             "Ray Train's checkpoints")

    def lora(self):
        from d3core.distill.lora import LoraSettings

        return LoraSettings(self.lora_rank, self.lora_alpha, tuple(self.lora_targets)) if self.lora_rank else None

    @property
    def storage_path(self) -> str:
        """Ray Train's storage: kept out of the export directory, so that directory can be published as is."""
        if self.storage:
            return self.storage
        out = Path(self.out.removeprefix("file://")).resolve()
        return str(out.parent / "_train" / out.name)

    def worker_cfg(self) -> dict:
        keys = ("masking", "use_gpu", "threads_per_worker", "batch_size", "lr", "warmup_steps", "weight_decay",
                "grad_clip", "mask_ratio_min", "mask_ratio_max", "ckpt_every", "seed", "fault_at_step",
                "fault_marker")
        out = {k: getattr(self, k) for k in keys}
        out["window_sizes"] = list(self.window_sizes)
        out["lora"] = self.lora() and dataclasses.asdict(self.lora())
        out["loss_weights"] = {"entropy_weight": self.entropy_weight, "entropy_temperature": self.entropy_temperature}
        return out


# -- data ---------------------------------------------------------------------------------------
def load_trajectory_table(cfg: DistillConfig):
    """Every validated shard as one table (correct rows only unless told otherwise)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from d3core import trajectory as T

    shards = T.list_shards(cfg.trajectories)
    if not shards:
        raise FileNotFoundError(f"no trajectory shards under {cfg.trajectories!r}: run pipelines/trajectories.py "
                                "first, or point --trajectories at its --out")
    table = pa.concat_tables([T.read_shard(cfg.trajectories, p) for p in shards])
    if len(set(table.column("id").to_pylist())) != table.num_rows:
        raise T.TrajectoryFormatError(f"{cfg.trajectories}: row ids repeat across shards")
    if cfg.only_correct:
        table = table.filter(pc.field("is_correct"))
    teachers = sorted(set(table.column("teacher").to_pylist()))
    if table.num_rows < cfg.batch_size:
        raise ValueError(f"{table.num_rows} usable trajectory rows < batch_size={cfg.batch_size}: generate more "
                         "trajectories or lower --batch-size")
    return table.select(["id", "prompt_ids", "response_ids", "unmask_step"]), teachers


def plan(cfg: DistillConfig, n_rows: int) -> tuple[int, int]:
    per_worker = cfg.batch_size // cfg.num_workers
    steps_per_epoch = (n_rows // cfg.num_workers) // per_worker
    return (cfg.max_steps or cfg.epochs * steps_per_epoch), steps_per_epoch


# -- export ---------------------------------------------------------------------------------------
def export_student(cfg: DistillConfig, checkpoint: str, init: str, summary: dict) -> list[str]:
    """Write the student from the sharded checkpoint at ``checkpoint`` to ``cfg.out``, in ``init``'s layout.

    Tensors stream from the checkpoint shard by shard (LoRA adapters merged on the way) in the
    preset's dtype; config, tokenizer files, generation config and license come from the teacher.
    """
    import torch

    from d3core.models.checkpoint import expand_param_map, load_config
    from d3core.models.export import ModelCard, teacher_license
    from d3core.models.export import export_student as write_export
    from d3core.models.hub import resolve_checkpoint
    from d3core.models.registry import get_architecture
    from pipelines.train_checkpoint import student_fetcher

    teacher = resolve_checkpoint(init, weights=False, trust_remote_code=cfg.trust_remote_code)
    arch = load_config(teacher)
    official_to_ours = expand_param_map(get_architecture(arch.arch).param_map, arch.num_layers)
    fetch = student_fetcher(checkpoint, official_to_ours, cfg.lora())
    card = ModelCard(title=f"{Path(cfg.out.rstrip('/')).name} (d3ray student)", base_model=init,
                     license=teacher_license(teacher) or _shipped_license(teacher), recipe=recipe(cfg, summary))
    return write_export(cfg.out, init, fetch, getattr(torch, cfg.export_dtype), card,
                        trust_remote_code=cfg.trust_remote_code, max_shard_bytes=cfg.max_shard_bytes)


def _shipped_license(teacher: str) -> str | None:
    """The embedded tiny teacher is d3ray's own (trained by pipelines/pretrain.py): the project's license."""
    from d3core.models.shipped import TINY_TEACHER_DIR

    return "apache-2.0" if Path(teacher).resolve() == TINY_TEACHER_DIR else None


def recipe(cfg: DistillConfig, summary: dict) -> dict:
    """The settings a model card reports for this run."""
    lora = cfg.lora()
    return {"method": f"{cfg.masking} masking + certainty forcing (entropy weight {cfg.entropy_weight}, "
                      f"temperature {cfg.entropy_temperature})",
            "trajectories": f"{summary['rows']} rows" + (" (correct answers only)" if cfg.only_correct else ""),
            "steps": summary["steps"], "global batch": cfg.batch_size, "workers": cfg.num_workers,
            "lr (peak, cosine)": cfg.lr, "warmup steps": cfg.warmup_steps, "weight decay": cfg.weight_decay,
            "window sizes": list(cfg.window_sizes), "mask ratio": [cfg.mask_ratio_min, cfg.mask_ratio_max],
            "fine-tuning": f"LoRA rank {lora.rank}, alpha {lora.alpha} on {list(lora.targets)}, merged" if lora
            else "full", "weights": cfg.export_dtype, "preset": cfg.preset, "seed": cfg.seed}


def read_summary(out: str) -> dict | None:
    fs, root = fsspec.core.url_to_fs(out)
    path = root.rstrip("/") + "/" + SUMMARY
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


# -- driver ---------------------------------------------------------------------------------------
def run_distill(cfg: DistillConfig) -> dict:
    """Train (or resume) and export; returns the summary. A finished ``out`` is returned as is."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.distill_worker import train_loop
    from pipelines.train_checkpoint import checkpoint_uri, read_trainer_state

    done = read_summary(cfg.out)
    if done is not None:
        logger.info("student already exported at %s (%s); skipping", cfg.out, SUMMARY)
        return done
    table, teachers = load_trajectory_table(cfg)
    init = cfg.init or _teacher_uri(teachers)
    _check_teacher(init, cfg)
    max_steps, steps_per_epoch = plan(cfg, table.num_rows)
    if max_steps < 1:
        raise ValueError(f"{table.num_rows} rows give 0 steps at batch_size={cfg.batch_size}")
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=True)
    ds = ray.data.from_arrow(table)
    logger.info("distilling %s from %d trajectories (%s masking): %d steps, %d per epoch, %d workers", init,
                table.num_rows, cfg.masking, max_steps, steps_per_epoch, cfg.num_workers)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.worker_cfg(), "init": init, "max_steps": max_steps,
                           "steps_per_epoch": steps_per_epoch, "storage_path": cfg.storage_path},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.threads_per_worker if cfg.use_gpu else 1}),
        run_config=ray.train.RunConfig(
            name="distill", storage_path=cfg.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        datasets={"train": ds},
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    train_seconds = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"training under {cfg.storage_path} ended without a checkpoint; see the worker logs")
    checkpoint = checkpoint_uri(result.checkpoint, cfg.storage_path)
    state = read_trainer_state(checkpoint)
    uses = list(state["uses"].values())
    summary = {"config": dataclasses.asdict(cfg), "init": init, "rows": table.num_rows, "steps": state["step"],
               "optimizer_steps": state["optimizer_steps"], "resumed_from": state["resumes"], "checkpoint": checkpoint,
               "row_uses": {"rows_used": len(uses), "min": min(uses, default=0), "max": max(uses, default=0)},
               "max_steps": max_steps, "steps_per_epoch": steps_per_epoch, "train_seconds": train_seconds,
               "final_metrics": state["history"][-1] if state["history"] else {}, "history": state["history"]}
    t0 = time.perf_counter()
    summary["files"] = export_student(cfg, checkpoint, init, summary)
    summary["export_seconds"] = time.perf_counter() - t0
    fs, root = fsspec.core.url_to_fs(cfg.out)
    with fs.open(root.rstrip("/") + "/" + SUMMARY, "w") as f:
        json.dump(summary, f, indent=2, default=str)
    logger.info("exported the student to %s after %d steps in %.0f s", cfg.out, state["step"], train_seconds)
    if cfg.push_to_hub:
        from d3core.models.export import push_to_hub

        summary["pushed"] = push_to_hub(cfg.out, cfg.push_to_hub)
    return summary


def _check_teacher(init: str, cfg: DistillConfig) -> None:
    """Before any training: the teacher resolves, and a remote-code tokenizer has the flag it needs."""
    from d3core.models.hub import resolve_checkpoint
    from d3core.models.tokenizer import check_remote_code

    check_remote_code(resolve_checkpoint(init, weights=False, trust_remote_code=cfg.trust_remote_code),
                      cfg.trust_remote_code)


def _teacher_uri(teachers: list[str]) -> str:
    if len(teachers) != 1:
        raise ValueError(f"trajectories come from teachers {teachers}: pass --init to choose the student's start")
    return teachers[0]


def parse_args(argv: list[str] | None = None) -> DistillConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(DistillConfig):
        if f.name in ("extra", "fault_at_step", "fault_marker"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("window_sizes", "lora_targets"):
            p.add_argument(flag, type=int if f.name == "window_sizes" else str, nargs="+", default=f.default)
        elif f.name in ("use_gpu", "only_correct"):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=f.default)
        elif f.name == "trust_remote_code":
            p.add_argument(flag, action="store_true", help="run the teacher tokenizer's own Python code (Dream)")
        else:
            p.add_argument(flag, type=type(f.default) if f.default is not None else str, default=f.default)
    return DistillConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    summary = run_distill(parse_args(argv))
    print(json.dumps({k: summary[k] for k in ("init", "rows", "steps", "train_seconds")}, indent=2))


if __name__ == "__main__":
    main()
