"""The Ray Train worker of ``pipelines/distill.py``: FSDP2 student, exact data-parallel loss, checkpoints.

Data semantics (documented in docs/distill.md): a worker reads its split of the trajectory
dataset once (``get_dataset_shard``), then every epoch visits its rows in a seeded order
that depends only on ``(seed, epoch, row id)``. A step takes ``batch_size / world`` rows
per worker; an epoch ends when any worker cannot fill its part (drop-last), so every row is
used at most once per epoch. A checkpoint records the step, the epoch and the ids consumed
so far in that epoch; a resumed run skips exactly those ids, whichever worker now holds them.
Checkpoints are sharded (``pipelines/train_checkpoint.py``): each rank writes its own FSDP2
shards of the model and optimizer, and a resumed run may have another number of workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

logger = logging.getLogger("d3ray.distill")


def _order_key(seed: int, epoch: int, row_id: str) -> bytes:
    return hashlib.blake2b(f"{seed}:{epoch}:{row_id}".encode(), digest_size=8).digest()


def epoch_order(rows: list[dict], seed: int, epoch: int) -> list[dict]:
    return sorted(rows, key=lambda r: _order_key(seed, epoch, r["id"]))


def lr_at(step: int, max_steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(max_steps - warmup, 1)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if world()[1] > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def shard_model(model: torch.nn.Module, use_gpu: bool) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` every transformer block, then the root (bf16 params, fp32 reduce on GPU)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if world()[1] == 1 and not use_gpu:
        return model
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if use_gpu \
        else MixedPrecisionPolicy()
    # On CPU (gloo) collectives dominate a small model's step: keep blocks unsharded between
    # forward and backward instead of gathering them twice.
    reshard = use_gpu
    for block in model.layers:
        fully_shard(block, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mp_policy=mp, reshard_after_forward=reshard)
    return model


def distill_step(model, optimizer, objective, rows: list[dict], step: int, max_steps: int, epoch_progress: float,
                 seed: int, lr: float, grad_clip: float) -> dict[str, float]:
    """One optimizer step on this worker's rows; loss and gradients are those of the global batch."""
    from d3core.distill.objective import collate_rows, combine, loss_sums

    cfg = model.config
    batch = collate_rows([r["id"] for r in rows], [r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows],
                         [r["unmask_step"] for r in rows], cfg.mask_id, cfg.pad_id)
    sums, counts = loss_sums(model, objective, batch, step, max_steps, epoch_progress, seed)
    keys = sorted(counts)
    global_counts = all_reduce(torch.stack([counts[k] for k in keys]).detach().clone())
    loss, _ = combine(sums, dict(zip(keys, global_counts)), objective.weights)
    _, size = world()
    (loss * size).backward()  # FSDP averages gradients over workers; the loss is already global
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # Each worker's part is its sum over the *global* count, so the parts add up to the global means.
    parts_keys = sorted(sums)
    local = torch.stack([sums[k].detach() / global_counts[keys.index(k)].clamp_min(1.0) for k in parts_keys])
    total = all_reduce(torch.cat([local, loss.detach()[None]]))
    tokens = all_reduce(torch.tensor(float(batch.clean.numel())))
    out = {k: float(v) for k, v in zip(parts_keys, total[:-1])}
    out.update(loss=float(total[-1]), grad_norm=float(grad_norm), tokens=float(tokens))
    return out


def full_model_state(model) -> dict:
    """The unsharded model state dict (gathered on every rank): for the diagnostic probe only, never checkpoints."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_steps(optimizer) -> int:
    """How many updates the optimizer's state has seen (AdamW's per-parameter ``step``)."""
    return max((int(s["step"]) for s in optimizer.state.values() if "step" in s), default=0)


def gather_ids(ids: list[str]) -> list[str]:
    return sorted({i for part in _gather(list(ids)) for i in part})


def gather_uses(base: dict[str, int], local: dict[str, int]) -> dict[str, int]:
    """``base`` (identical on every rank) plus every worker's uses since the last checkpoint."""
    total = dict(base)
    for part in _gather(local):
        for row_id, n in part.items():
            total[row_id] = total.get(row_id, 0) + n
    return total


def _gather(obj) -> list:
    _, size = world()
    if size == 1:
        return [obj]
    out: list = [None] * size
    dist.all_gather_object(out, obj)
    return out


def train_loop(config: dict) -> None:
    """Ray Train entry point (``train_loop_per_worker``)."""
    import ray.train

    from d3core.distill.losses import LossWeights
    from d3core.distill.objective import DistillObjective
    from d3core.models.checkpoint import load_pretrained
    from pipelines.train_checkpoint import checkpoint_uri, load_checkpoint

    cfg = config["cfg"]
    torch.set_num_threads(cfg["threads_per_worker"])
    rank, size = world()
    use_gpu = cfg["use_gpu"] and torch.cuda.is_available()
    device = torch.device(f"cuda:{ray.train.get_context().get_local_rank()}") if use_gpu else torch.device("cpu")
    objective = DistillObjective(masking=cfg["masking"], window_sizes=tuple(cfg["window_sizes"]),
                                 mask_ratio_min=cfg["mask_ratio_min"], mask_ratio_max=cfg["mask_ratio_max"],
                                 weights=LossWeights(**cfg["loss_weights"]))
    model = load_pretrained(config["init"], device=device).train()
    if cfg["lora"]:
        from d3core.distill.lora import LoraSettings, apply_lora

        lora = dict(cfg["lora"], targets=tuple(cfg["lora"]["targets"]))
        model = apply_lora(model, LoraSettings(**lora))
    model = shard_model(model, use_gpu)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"],
                                  betas=(0.9, 0.95), weight_decay=cfg["weight_decay"])
    step, epoch, consumed = 0, 0, set()
    uses: dict[str, int] = {}  # every row's uses up to the last checkpoint (the audit of the data semantics)
    new_uses: dict[str, int] = {}  # this worker's uses since then
    history: list[dict] = []  # per-step metrics (identical on every rank: they are all-reduced)
    resumes: list[int] = []  # the step of every checkpoint this run was resumed from
    checkpoint = ray.train.get_checkpoint()  # v2: the latest one, after a restart or in a rerun of the same run
    if checkpoint is not None:
        state = load_checkpoint(checkpoint_uri(checkpoint, config["storage_path"]), model, optimizer)
        step, epoch, consumed = state["step"], state["epoch"], set(state["consumed"])
        uses = dict(state["uses"])
        history = list(state["history"])
        resumes = [*state.get("resumes", []), step]
        if rank == 0:
            logger.info("resumed at step %d (epoch %d, %d rows of it consumed) from %d worker(s) on %d", step, epoch,
                        len(consumed), state["world_size"], size)

    rows = [dict(id=str(i), prompt_ids=list(map(int, p)), response_ids=list(map(int, r)),
                 unmask_step=list(map(int, s)))
            for batch in ray.train.get_dataset_shard("train").iter_batches(batch_size=1024, batch_format="pandas")
            for i, p, r, s in zip(batch["id"], batch["prompt_ids"], batch["response_ids"], batch["unmask_step"])]
    per_worker = cfg["batch_size"] // size
    max_steps, steps_per_epoch = config["max_steps"], config["steps_per_epoch"]
    fault_step = cfg["fault_at_step"]  # tests only: one worker exits hard once at this step
    t_last = time.perf_counter()
    while step < max_steps:
        pending = [r for r in epoch_order(rows, cfg["seed"], epoch) if r["id"] not in consumed]
        pos = 0
        while step < max_steps:
            take = pending[pos: pos + per_worker]
            enough = all_reduce(torch.tensor(1 if len(take) == per_worker else 0), dist.ReduceOp.MIN)
            if not int(enough):
                break
            pos += per_worker
            progress = epoch + min((step - epoch * steps_per_epoch) / max(steps_per_epoch, 1), 0.999)
            lr = lr_at(step, max_steps, cfg["lr"], cfg["warmup_steps"])
            out = distill_step(model, optimizer, objective, take, step, max_steps, progress, cfg["seed"], lr,
                               cfg["grad_clip"])
            consumed.update(r["id"] for r in take)
            for r in take:
                new_uses[r["id"]] = new_uses.get(r["id"], 0) + 1
            step += 1
            now = time.perf_counter()
            out.update(step=step, epoch=epoch, lr=lr, workers=size,
                       tokens_per_s=out.pop("tokens") / max(now - t_last, 1e-9))
            t_last = now
            history.append(out)
            if rank == 0:
                logger.info("step %d/%d %s", step, max_steps,
                            " ".join(f"{k}={v:.4g}" for k, v in out.items() if k not in ("step",)))
            # Report (metrics + checkpoint) only at checkpoint steps: Ray Train v2 hands each report to
            # its controller through a one-slot queue that the controller drains on its own poll
            # interval, so reporting every step throttles a fast step to that interval (~2 s).
            if step % cfg["ckpt_every"] == 0 or step == max_steps:
                uses, new_uses = gather_uses(uses, new_uses), {}
                report(model, optimizer, out, step, epoch, consumed, uses, history, resumes)
            if step == fault_step and rank == size - 1 and _first_fault(cfg["fault_marker"]):
                # Ray Train v2 registers a reported checkpoint when its controller next polls the
                # workers (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default); a worker that dies
                # sooner takes its last report with it. Wait that long, like a crash well after it.
                time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)) + 1.0)
                logger.warning("fault injection: worker %d exits at step %d", rank, step)
                os._exit(1)
        epoch += 1
        consumed = set()


def _first_fault(marker_path: str) -> bool:
    """Fault injection (tests) fires once: a marker file records that it has."""
    marker = Path(marker_path)
    if marker.exists():
        return False
    marker.write_text(json.dumps({"fired": True}))
    return True


def report(model, optimizer, metrics: dict, step: int, epoch: int, consumed: set[str],
           uses: dict[str, int], history: list[dict], resumes: list[int]) -> None:
    """Report metrics with a sharded checkpoint: every rank writes its own shards, Ray merges the directories."""
    import ray.train

    from pipelines.train_checkpoint import save_checkpoint

    ids = gather_ids(sorted(consumed))
    _, size = world()
    state = {"step": step, "epoch": epoch, "consumed": ids, "uses": uses, "history": history, "resumes": resumes,
             "optimizer_steps": optimizer_steps(optimizer), "world_size": size}
    with tempfile.TemporaryDirectory(prefix="d3ray-ckpt-") as d:
        save_checkpoint(d, model, optimizer, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"checkpoint-step{step:08d}")


def probe_step(config: dict) -> None:
    """Diagnostic worker: one step on ``rows[rank::world]`` of a fixed global batch.

    Reports the loss parts and writes the updated full state dict to ``config["dump"]``, so
    the same batch on 1 and on N workers can be compared (tests/pipelines/test_distill.py).
    """
    import ray.train

    from d3core.distill.losses import LossWeights
    from d3core.distill.objective import DistillObjective
    from d3core.models.checkpoint import load_pretrained

    torch.set_num_threads(1)
    rank, size = world()
    model = shard_model(load_pretrained(config["init"]).train(), use_gpu=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    objective = DistillObjective(masking=config["masking"], window_sizes=(8,), weights=LossWeights(entropy_weight=1.0))
    out = distill_step(model, optimizer, objective, config["rows"][rank::size], step=3, max_steps=10,
                       epoch_progress=0.3, seed=0, lr=1e-2, grad_clip=1e9)
    model_sd = full_model_state(model)
    if rank == 0:
        torch.save({"metrics": out, "model": model_sd}, config["dump"])
    ray.train.report(out)
