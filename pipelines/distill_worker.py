"""The Ray Train worker of ``pipelines/distill.py``: FSDP2 student, exact data-parallel loss, checkpoints.

Data semantics (documented in docs/distill.md): every worker reads every trajectory row once
(the dataset is not split, ``DataConfig(datasets_to_split=[])``), and every epoch orders the
rows by a hash of ``(seed, epoch, row id)``. Step ``s`` of an epoch takes the next
``batch_size`` rows of that order, and rank ``r`` trains on rows ``[r*b, (r+1)*b)`` of it
(``b = batch_size / world``); an epoch ends when a full global batch no longer fits
(drop-last), so every row is used at most once per epoch. The global batch of every step
is therefore fixed by the seed and the rows alone: not by the order rows stream in, the
load on the machine, or the number of workers. A checkpoint records the step, the epoch and
the ids consumed so far in that epoch (identical on every rank); a resumed run continues the
same order. Checkpoints are sharded (``pipelines/train_checkpoint.py``): each rank writes its
own FSDP2 shards of the model and optimizer, and a resumed run may have another number of
workers. A restarted worker group resumes from the newest complete checkpoint on disk, also
one the Ray Train controller had not registered yet.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tempfile
import time

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


def shard_model(model: torch.nn.Module, use_gpu: bool, mesh=None) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` every transformer block, then the root (bf16 params, fp32 reduce on GPU).

    ``mesh``: the device mesh to shard over (default: FSDP's, one dimension over the process group)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if world()[1] == 1 and not use_gpu:
        return model
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if use_gpu \
        else MixedPrecisionPolicy()
    # On CPU (gloo) collectives dominate a small model's step: keep blocks unsharded between
    # forward and backward instead of gathering them twice.
    reshard = use_gpu
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
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


def optimizer_steps(optimizer) -> int:
    """How many updates the optimizer's state has seen (AdamW's per-parameter ``step``)."""
    return max((int(s["step"]) for s in optimizer.state.values() if "step" in s), default=0)


def choose_resume(experiment_uri: str, digest: str, num_to_keep: int) -> str | None:
    """Rank 0 picks the newest complete checkpoint on disk (and tidies the rest); every rank gets its URI."""
    from pipelines.train_checkpoint import reconcile

    rank, size = world()
    choice = [reconcile(experiment_uri, digest, num_to_keep) if rank == 0 else None]
    if size > 1:
        dist.broadcast_object_list(choice, src=0)
    return choice[0]


def load_rows(shard) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every row of the (unsplit) dataset, compactly: id -> (prompt ids, response ids, unmask steps)."""
    rows = {}
    for batch in shard.iter_batches(batch_size=1024, batch_format="pandas"):
        for i, p, r, s in zip(batch["id"], batch["prompt_ids"], batch["response_ids"], batch["unmask_step"]):
            rows[str(i)] = (torch.as_tensor(p, dtype=torch.int32), torch.as_tensor(r, dtype=torch.int32),
                            torch.as_tensor(s, dtype=torch.int16))
    return rows


def as_row(row_id: str, row: tuple) -> dict:
    p, r, s = row
    return dict(id=row_id, prompt_ids=p.tolist(), response_ids=r.tolist(), unmask_step=s.tolist())


def train_loop(config: dict) -> None:
    """Ray Train entry point (``train_loop_per_worker``); ``config["cfg"]`` is the DistillConfig itself."""
    import ray.train

    from d3core.models.checkpoint import load_pretrained
    from pipelines.cluster import progress_setter
    from pipelines.fingerprint import digest as fingerprint_digest
    from pipelines.train_checkpoint import load_checkpoint

    cfg = config["cfg"]
    hooks = config.get("hooks")
    digest = fingerprint_digest(config["fingerprint"])
    torch.set_num_threads(cfg.threads_per_worker)
    rank, size = world()
    use_gpu = cfg.use_gpu and torch.cuda.is_available()
    device = torch.device(f"cuda:{ray.train.get_context().get_local_rank()}") if use_gpu else torch.device("cpu")
    objective = cfg.objective()
    model = load_pretrained(config["init"], device=device).train()
    if cfg.lora_rank:
        from d3core.distill.lora import apply_lora

        torch.manual_seed(cfg.seed)  # the adapters' initialisation: the same on every rank and every run
        model = apply_lora(model, cfg.lora())
    model = shard_model(model, use_gpu)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    step, epoch, consumed = 0, 0, set()
    uses: dict[str, int] = {}  # every row's uses so far (the audit of the data semantics)
    history: list[dict] = []  # per-step metrics (identical on every rank: they are all-reduced)
    resumes: list[int] = []  # the step of every checkpoint this run was resumed from
    resume = choose_resume(cfg.experiment_uri, digest, cfg.num_to_keep)
    if resume is not None:
        state = load_checkpoint(resume, model, optimizer)
        step, epoch, consumed = state["step"], state["epoch"], set(state["consumed"])
        uses = dict(state["uses"])
        history = list(state["history"])
        resumes = [*state.get("resumes", []), step]
        if rank == 0:
            logger.info("resumed at step %d (epoch %d, %d rows of it consumed) from %s (%d worker(s), now %d)", step,
                        epoch, len(consumed), resume, state["world_size"], size)

    set_progress = progress_setter(config.get("progress") if rank == 0 else None)  # the driver's bar
    if hooks is not None and hasattr(hooks, "on_start"):
        hooks.on_start(rank, size)
    rows = load_rows(ray.train.get_dataset_shard("train"))
    per_worker = cfg.batch_size // size
    max_steps, steps_per_epoch = config["max_steps"], config["steps_per_epoch"]
    meta = {"fingerprint": config["fingerprint"], "fingerprint_digest": digest}
    t_last = time.perf_counter()
    while step < max_steps:
        pending = [i for i in sorted(rows, key=lambda i: _order_key(cfg.seed, epoch, i)) if i not in consumed]
        pos = 0
        while step < max_steps and pos + cfg.batch_size <= len(pending):
            batch_ids = pending[pos: pos + cfg.batch_size]
            pos += cfg.batch_size
            take = [as_row(i, rows[i]) for i in batch_ids[rank * per_worker:(rank + 1) * per_worker]]
            progress = epoch + min((step - epoch * steps_per_epoch) / max(steps_per_epoch, 1), 0.999)
            lr = lr_at(step, max_steps, cfg.lr, cfg.warmup_steps)
            out = distill_step(model, optimizer, objective, take, step, max_steps, progress, cfg.seed, lr,
                               cfg.grad_clip)
            consumed.update(batch_ids)
            for i in batch_ids:
                uses[i] = uses.get(i, 0) + 1
            step += 1
            now = time.perf_counter()
            out.update(step=step, epoch=epoch, lr=lr, workers=size,
                       tokens_per_s=out.pop("tokens") / max(now - t_last, 1e-9))
            t_last = now
            history.append(out)
            if rank == 0:
                logger.info("step %d/%d %s", step, max_steps,
                            " ".join(f"{k}={v:.4g}" for k, v in out.items() if k not in ("step",)))
                set_progress(step)
            # Report (metrics + checkpoint) only at checkpoint steps: Ray Train v2 hands each report to
            # its controller through a one-slot queue that the controller drains on its own poll
            # interval, so reporting every step throttles a fast step to that interval (~2 s).
            if step % cfg.ckpt_every == 0 or step == max_steps:
                report(model, optimizer, out, {**meta, "step": step, "epoch": epoch, "consumed": sorted(consumed),
                                               "uses": uses, "history": history, "resumes": resumes})
            if hooks is not None and hasattr(hooks, "on_step"):
                hooks.on_step(step, rank, size)
        epoch += 1
        consumed = set()


def report(model, optimizer, metrics: dict, state: dict) -> None:
    """Report metrics with a sharded checkpoint: every rank writes its own shards, Ray merges the directories."""
    import ray.train

    from pipelines.train_checkpoint import checkpoint_dir_name, save_checkpoint

    _, size = world()
    state = {**state, "optimizer_steps": optimizer_steps(optimizer), "world_size": size}
    with tempfile.TemporaryDirectory(prefix="d3ray-ckpt-") as d:
        save_checkpoint(d, model, optimizer, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=checkpoint_dir_name(state["step"]))
