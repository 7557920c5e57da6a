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

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pipelines import _io
from pipelines import fingerprint as F
from pipelines.cluster import validate_resources
from pipelines.trajectory_store import TrajectorySet, read_trajectory_set  # noqa: F401  (the reader)

logger = logging.getLogger("d3ray.distill")

STAGE = "distill"
SUMMARY = "distill_summary.json"
RUN_NAME = "distill"  # Ray Train's run (experiment) name under the storage path
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
# DistillConfig fields that decide the student (the rest decide where and how fast it is made).
RESULT_FIELDS = ("masking", "only_correct", "use_gpu", "batch_size", "epochs", "max_steps", "lr", "warmup_steps",
                 "weight_decay", "grad_clip", "window_sizes", "mask_ratio_min", "mask_ratio_max", "entropy_weight",
                 "entropy_temperature", "lora_rank", "lora_alpha", "lora_targets", "seed", "export_dtype",
                 "max_shard_bytes")


@dataclass(frozen=True)
class DistillConfig:
    """Distillation: which trajectories, which student start, the objective, and the Ray Train layout.

    The defaults are the tiny recipe (chosen by a sweep and measured on 2 CPU cores,
    docs/benchmarks.md): the window grows to the whole 48-slot response, the mask ratio reaches
    1.0 (d3LLM: 0.8), so late in training whole windows are masked, and certainty forcing is
    weighted 12 (d3LLM: 2). On the retrained teacher the mask ratio lifts the student from ~2.1x to
    ~2.8x the teacher's TPF and the weight to ~3.1x, at <= 1 point of accuracy.
    """

    trajectories: str = "runs/trajectories"  # trajectories output (its manifest.json lists the shards read)
    out: str = "runs/student"  # the exported student (HF layout, publishable as is)
    init: str | None = None  # student start (a dLLM checkpoint); None: the trajectories' teacher
    storage: str | None = None  # Ray Train storage (path, s3://, gs://); None: <dir of OUT>/_train/<name of OUT>
    trust_remote_code: bool = False  # the teacher's tokenizer is Python shipped with it (Dream): allow it
    export_dtype: str = "float32"  # dtype of the exported weights (bfloat16 like the official 8B checkpoints)
    max_shard_bytes: int = 5 * 10**9  # export: shard the safetensors above this size (transformers' "5GB")
    push_to_hub: str | None = None  # after the export, upload it to this hub model repo (ORG/NAME)
    masking: str = "trajectory"  # trajectory (d3LLM pseudo-trajectories) or random (dParallel's masking)
    only_correct: bool = True  # train on the rows the task's scorer marked correct only
    num_workers: int = 2  # Ray Train workers (FSDP2 ranks)
    use_gpu: bool = False  # one GPU per worker, bf16 params with fp32 reduction (NCCL); False: CPU, gloo
    threads_per_worker: int = 1  # torch threads per worker (and CPUs it reserves on GPU presets)
    # custom Ray resources each worker reserves, e.g. {"worker": 1}: workers run only on nodes that declare them
    resources: dict[str, float] = field(default_factory=dict)
    batch_size: int = 32  # global batch (rows per optimizer step, split evenly over the workers)
    epochs: int = 5  # passes over the rows (each row used at most once per epoch)
    max_steps: int | None = None  # stop after this many optimizer steps; None: epochs x steps per epoch
    lr: float = 2e-4  # peak learning rate (linear warmup, then cosine to 10% of it)
    warmup_steps: int = 20  # linear warmup steps (0: none)
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # global gradient-norm clip
    window_sizes: tuple[int, ...] = (16, 48)  # masking window per epoch (interpolated within one), <= gen_length
    mask_ratio_min: float = 0.0  # mask ratio range of a view, 0 <= min <= max <= 1
    mask_ratio_max: float = 1.0  # upper end of the mask ratio range (the 8B recipes: 0.8, as d3LLM)
    entropy_weight: float = 12.0  # certainty-forcing weight (0 turns it off)
    entropy_temperature: float = 0.5  # temperature of the certainty-forcing entropy (> 0)
    ckpt_every: int = 50  # a sharded checkpoint every this many steps (and at the last)
    num_to_keep: int = 2  # checkpoints kept on disk
    lora_rank: int = 0  # 0: full fine-tuning; > 0: peft LoRA on lora_targets, merged on export
    lora_alpha: float = 16.0  # LoRA scaling (alpha / rank)
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")  # projections that get adapters
    max_failures: int = 2  # worker-group restarts (from the newest checkpoint) before the run fails
    seed: int = 0  # seeds the row order and the masking

    def __post_init__(self) -> None:
        if not self.trajectories or not self.out:
            raise ValueError(f"trajectories={self.trajectories!r}, out={self.out!r}: both must name a directory")
        if self.export_dtype not in EXPORT_DTYPES:
            raise ValueError(f"export_dtype={self.export_dtype!r}: must be one of {EXPORT_DTYPES}")
        if self.max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes={self.max_shard_bytes}: must be >= 1")
        if self.init is not None and not self.init:
            raise ValueError("init='': give a checkpoint, or None to start from the trajectories' teacher")
        if self.push_to_hub is not None:
            from d3core.models.hub import HubRef

            HubRef(self.push_to_hub)  # ORG/NAME or a ValueError naming the form
            if "://" in self.out and not self.out.startswith("file://"):
                raise ValueError(f"push_to_hub={self.push_to_hub!r} uploads a local export, but out={self.out!r} "
                                 "is remote: export locally, or upload with `hf upload` from a copy")
        for name in ("num_workers", "threads_per_worker", "batch_size", "epochs", "ckpt_every", "num_to_keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        validate_resources(self.resources, "resources")
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by num_workers={self.num_workers}: "
                             "the global batch is split evenly over the workers")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps}: must be >= 1, or None for epochs x steps per epoch")
        if self.warmup_steps < 0 or self.max_failures < 0 or self.lora_rank < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps}, max_failures={self.max_failures}, lora_rank="
                             f"{self.lora_rank}: must be >= 0")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr={self.lr}: must lie in (0, 1)")
        if self.weight_decay < 0 or not self.grad_clip > 0:
            raise ValueError(f"weight_decay={self.weight_decay}, grad_clip={self.grad_clip}: need weight_decay >= 0 "
                             "and grad_clip > 0")
        self.objective()  # window sizes, mask ratios, masking and loss weights, checked by d3core
        if self.lora_rank:
            self.lora()
        if not self.storage and "://" in self.out and not self.out.startswith("file://"):
            raise ValueError(f"out={self.out!r} is remote: pass --storage (a local path, s3:// or gs:// URI) for "
                             "Ray Train's checkpoints")

    def objective(self):
        from d3core.distill.losses import LossWeights
        from d3core.distill.objective import DistillObjective

        return DistillObjective(masking=self.masking, window_sizes=tuple(self.window_sizes),
                                mask_ratio_min=self.mask_ratio_min, mask_ratio_max=self.mask_ratio_max,
                                weights=LossWeights(entropy_weight=self.entropy_weight,
                                                    entropy_temperature=self.entropy_temperature))

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

    @property
    def experiment_uri(self) -> str:
        return _io.join(self.storage_path, RUN_NAME)


# -- data ---------------------------------------------------------------------------------------
def plan(cfg: DistillConfig, n_rows: int) -> tuple[int, int]:
    """(max steps, steps per epoch): an epoch is every full global batch of the rows (drop-last)."""
    steps_per_epoch = n_rows // cfg.batch_size
    return (cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch), steps_per_epoch


def require_filesystems(cfg: DistillConfig) -> None:
    """Every location's fsspec implementation is installed (else a ValueError naming the extra)."""
    _io.require_filesystems(trajectories=cfg.trajectories, out=cfg.out, storage=cfg.storage, init=cfg.init)


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
            else "full", "weights": cfg.export_dtype, "seed": cfg.seed}


def read_summary(out: str) -> dict | None:
    return _io.read_json(_io.join(out, SUMMARY))


# -- driver ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What a distillation run will do, worked out on the driver before Ray starts."""

    data: TrajectorySet
    init: str
    fingerprint: dict
    max_steps: int
    steps_per_epoch: int

    @property
    def digest(self) -> str:
        return F.digest(self.fingerprint)


def fingerprint(cfg: DistillConfig, data: TrajectorySet, init: str) -> dict:
    """The trajectories' own fingerprint, the student's start, and every setting that decides the student."""
    return {"stage": STAGE, "trajectories": data.manifest["fingerprint"],
            "init": F.checkpoint_identity(init, cfg.trust_remote_code),
            "settings": {name: _plain(getattr(cfg, name)) for name in RESULT_FIELDS}}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def prepare(cfg: DistillConfig) -> Plan:
    """Every check that needs no cluster: paths, the trajectory set, the student's start, the plan."""
    from d3core.models.checkpoint import load_config

    _io.require_directory(cfg.out, "out")
    _io.require_directory(cfg.storage_path, "storage")
    data = read_trajectory_set(cfg)
    init = cfg.init or data.teacher
    _check_teacher(init, cfg)
    arch = load_config(init)
    vocab = int(data.manifest["decode"]["vocab_size"])
    if arch.vocab_size < vocab:
        raise ValueError(f"init={init!r} has a vocabulary of {arch.vocab_size} tokens, the trajectories' teacher "
                         f"{vocab}: the student must read every token id of the rows; start from the teacher")
    if max(cfg.window_sizes) > data.gen_length:
        raise ValueError(f"window_sizes={list(cfg.window_sizes)}: the trajectories have gen_length={data.gen_length}, "
                         "and a window covers at most the whole response; lower them")
    n = data.table.num_rows
    if n < cfg.batch_size:
        raise ValueError(f"{n} usable trajectory rows (of {data.rows_total}) < batch_size={cfg.batch_size}: generate "
                         "more trajectories or lower --batch-size")
    max_steps, steps_per_epoch = plan(cfg, n)
    return Plan(data, init, fingerprint(cfg, data, init), max_steps, steps_per_epoch)


def claim(cfg: DistillConfig, plan_: Plan, overwrite: bool) -> dict | None:
    """The finished summary to reuse (same fingerprint), or None to train; refuses other runs' outputs.

    Looks at the export (``distill_summary.json``) and at Ray Train's storage (the checkpoints'
    ``trainer_state.json`` and the storage's fingerprint record); ``overwrite`` clears both.
    """
    from pipelines import train_checkpoint as C

    summary = read_summary(cfg.out)
    recorded = F.read_record(cfg.storage_path)
    if overwrite:
        _clear_export(cfg)
        _io.remove_tree(cfg.storage_path)
        return None
    if summary is not None:
        F.check(STAGE, cfg.out, summary.get("fingerprint", {"summary": "written by an older d3ray"}),
                plan_.fingerprint)
        return summary
    if recorded is not None:
        F.check(STAGE, cfg.storage_path, recorded.get("fingerprint"), plan_.fingerprint, option="--storage")
    for ckpt in C.list_checkpoints(cfg.experiment_uri):
        state = C.read_state_or_none(ckpt)
        if state is not None and state.get("fingerprint_digest") not in (None, plan_.digest):
            F.check(STAGE, cfg.storage_path, state.get("fingerprint", {"digest": state["fingerprint_digest"]}),
                    plan_.fingerprint, option="--storage")
    return None


_EXPORT_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".py", ".jinja", ".tiktoken", ".md")


def _clear_export(cfg: DistillConfig) -> None:
    """Remove a previous export from ``cfg.out``; refuse when the directory holds files no export writes."""
    fs, root = _io.fs_root(cfg.out)
    if not fs.exists(root):
        return
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    foreign = [n for n in names if not (n.endswith(_EXPORT_SUFFIXES) or n.upper().startswith(("LICENSE", "NOTICE"))
                                        or n.startswith(_io.TMP_PREFIX))]
    if foreign:
        raise ValueError(f"out={cfg.out!r} holds files a student export never writes ({foreign[:5]}); d3ray clears "
                         "only its own outputs: choose another --out, or move those files")
    if names:
        logger.warning("clearing the previous export in %s (%d files)", cfg.out, len(names))
    _io.remove_tree(cfg.out)


def run_distill(cfg: DistillConfig, overwrite: bool = False, hooks=None) -> dict:
    """Train (or resume) and export; returns the summary. A finished ``out`` of the same fingerprint is returned.

    ``hooks`` (optional, picklable) is handed to every worker: ``hooks.on_start(rank, world)`` runs
    before the worker reads its rows and ``hooks.on_step(step, rank, world)`` after each optimizer
    step, where defined (tests use them to kill or slow a worker at a chosen point).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines import train_checkpoint as C
    from pipelines.cluster import remote_progress, require_gpus, require_resources
    from pipelines.distill_worker import train_loop

    require_filesystems(cfg)
    plan_ = prepare(cfg)
    done = None if overwrite else claim(cfg, plan_, overwrite=False)
    if done is not None:
        logger.info("student already exported at %s with these settings (%s); skipping", cfg.out, SUMMARY)
        return done
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=True)
    if cfg.use_gpu:  # before anything is written or cleared: a refusal leaves the outputs as they were
        require_gpus(cfg.num_workers, "num_workers (use_gpu=True)")
    require_resources(cfg.resources, "resources")
    if overwrite:
        claim(cfg, plan_, overwrite=True)
    F.write_record(cfg.storage_path, STAGE, plan_.fingerprint, {"out": cfg.out, "trajectories": cfg.trajectories})
    C.reconcile(cfg.experiment_uri, plan_.digest, cfg.num_to_keep)
    table = plan_.data.table
    logger.info("distilling %s from %d trajectories (%s masking): %d steps, %d per epoch, %d workers", plan_.init,
                table.num_rows, cfg.masking, plan_.max_steps, plan_.steps_per_epoch, cfg.num_workers)
    progress = f"d3ray-distill-{uuid.uuid4().hex[:12]}"  # the driver's bar of training steps (moved by rank 0)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg, "init": plan_.init, "max_steps": plan_.max_steps,
                           "steps_per_epoch": plan_.steps_per_epoch, "fingerprint": plan_.fingerprint,
                           "hooks": hooks, "progress": progress},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.threads_per_worker if cfg.use_gpu else 1, **cfg.resources}),
        run_config=ray.train.RunConfig(
            name=RUN_NAME, storage_path=cfg.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.num_to_keep)),
        # every worker reads every row and takes its slice of each global batch (train_loop): the
        # batches are then fixed by (seed, epoch, row id), whatever order the rows stream in
        datasets={"train": ray.data.from_arrow(table)},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    t0 = time.perf_counter()
    with remote_progress(progress, plan_.max_steps, "distill steps", "step"):
        trainer.fit()
    train_seconds = time.perf_counter() - t0
    newest = C.reconcile(cfg.experiment_uri, plan_.digest, cfg.num_to_keep)
    if newest is None:
        raise RuntimeError(f"training under {cfg.storage_path} ended without a complete checkpoint; "
                           "see the worker logs")
    state = C.read_trainer_state(newest)
    if state["step"] != plan_.max_steps:
        raise RuntimeError(f"the newest checkpoint {newest} is at step {state['step']} of {plan_.max_steps}: "
                           "training stopped early; rerun to resume it")
    uses = list(state["uses"].values())
    summary = {"config": dataclasses.asdict(cfg), "init": plan_.init, "rows": table.num_rows,
               "fingerprint": plan_.fingerprint, "fingerprint_digest": plan_.digest, "steps": state["step"],
               "optimizer_steps": state["optimizer_steps"], "resumed_from": state["resumes"], "checkpoint": newest,
               "row_uses": {"rows_used": len(uses), "min": min(uses, default=0), "max": max(uses, default=0)},
               "max_steps": plan_.max_steps, "steps_per_epoch": plan_.steps_per_epoch, "train_seconds": train_seconds,
               "final_metrics": state["history"][-1] if state["history"] else {}, "history": state["history"]}
    t0 = time.perf_counter()
    _clear_export(cfg)  # a crashed export's files of another layout must not linger
    summary["files"] = export_student(cfg, newest, plan_.init, summary)
    summary["export_seconds"] = time.perf_counter() - t0
    _io.write_json(_io.join(cfg.out, SUMMARY), summary)  # written last: its presence marks the stage done
    logger.info("exported the student to %s after %d steps in %.0f s", cfg.out, state["step"], train_seconds)
    if cfg.push_to_hub:
        from d3core.models.export import push_to_hub

        summary["pushed"] = push_to_hub(cfg.out, cfg.push_to_hub)
    return summary


def _check_teacher(init: str, cfg: DistillConfig) -> None:
    """Before any training: the student's start resolves, and a remote-code tokenizer has the flag it needs."""
    from d3core.models.hub import resolve_checkpoint
    from d3core.models.tokenizer import check_remote_code

    local = resolve_checkpoint(init, weights=False, trust_remote_code=cfg.trust_remote_code)
    if not _io.exists(_io.join(local, "config.json")):
        raise ValueError(f"init={init!r}: no checkpoint there (no config.json; not a path, fsspec URI or hub id of an "
                         "HF-layout checkpoint); fix --init, or leave it unset to start from the trajectories' teacher")
    check_remote_code(local, cfg.trust_remote_code)


if __name__ == "__main__":  # the command line is pipelines/cli.py's (it reads the recipes, which import this stage)
    import runpy

    runpy.run_module("pipelines.cli", run_name="__main__")
