"""One distillation step at real 8B shape per FSDP2 shard, on fake tensors: memory and FLOPs per worker, no GPU.

The step is the pipeline's own: :func:`~pipelines.distill_worker.shard_model` with the GPU policy (bf16
compute, fp32 master weights and reduction) over a fake process group of ``world_size`` ranks, the
host side of the objective (:func:`~d3core.distill.objective.student_batch`) on real trajectory-shaped
rows, then forward and backward of the loss and an AdamW step on fake tensors. torch's
:class:`~torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker` gives this rank's peak memory
by category, :class:`~torch.utils.flop_counter.FlopCounterMode` the FLOPs.

The peak is that of a step's forward and backward once the optimizer's state exists (after a first
step). The optimizer step's own temporaries (foreach AdamW: about one more copy of the sharded state)
are not in it: the tracker counts the DTensor temporaries of ``optimizer.step`` at their global size.

The tensors are fake *CPU* tensors: on a CPU-only build, autograd aborts on fake CUDA tensors
(its engine builds a CUDA device guard, see :mod:`d3core.perf.fakecuda`). Sizes, dtypes and the
sharding are those of the GPU run; collectives are no-ops of the fake process group.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from d3core.distill.losses import LossWeights
from d3core.distill.objective import DistillObjective, collate_rows, combined_loss, student_batch, student_loss_sums


def dry_distill_step(arch: str, size: str, world_size: int = 8, rows_per_worker: int = 8, prompt_len: int = 256,
                     gen_length: int = 256, objective: DistillObjective | None = None, num_layers: int | None = None,
                     seed: int = 0) -> dict:
    """Peak memory (bytes, by category) and FLOPs of one step's forward and backward on rank 0 of ``world_size``."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend
    from torch.utils.flop_counter import FlopCounterMode

    from d3core.models.registry import build_model
    from pipelines.distill_worker import shard_model

    if dist.is_initialized():
        raise RuntimeError("dry_distill_step starts its own fake process group: call it in a process without one")
    objective = objective or DistillObjective(window_sizes=(32, 64), weights=LossWeights(entropy_weight=2.0))
    t0 = time.perf_counter()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        overrides = {"num_layers": num_layers} if num_layers else {}
        model = build_model(arch, size, device="meta", dtype=torch.float32, **overrides)
        cfg = model.config
        rng = np.random.default_rng(seed)
        ids = [f"r{i}" for i in range(rows_per_worker)]
        prompts = rng.integers(0, min(cfg.vocab_size, 100_000), (rows_per_worker, prompt_len)).tolist()
        responses = rng.integers(0, min(cfg.vocab_size, 100_000), (rows_per_worker, gen_length)).tolist()
        steps = [rng.permutation(gen_length).tolist() for _ in range(rows_per_worker)]
        batch = collate_rows(ids, prompts, responses, steps, cfg.mask_id, cfg.pad_id)
        sb = student_batch(objective, batch, cfg.mask_id, step=10, max_steps=100, epoch_progress=0.5, seed=seed)
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = shard_model(model.to_empty(device="cpu").train(), use_gpu=True, mesh=mesh)
            optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, betas=(0.9, 0.95), foreach=True)
            def step(update: bool) -> None:
                sums, counts = student_loss_sums(model, objective.weights, sb)
                loss, _ = combined_loss(sums, counts, objective.weights)
                (loss * world_size).backward()
                if update:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

            step(update=True)  # the optimizer's state exists from the first step on: measure a later one
            tracker = FSDPMemTracker(model, optimizer)
            with tracker, FlopCounterMode(display=False) as flops:
                step(update=False)
            snapshot = tracker.get_tracker_snapshot("peak")
    finally:
        dist.destroy_process_group()
    device = next(iter(snapshot))
    peak = {str(k): float(v) for k, v in snapshot[device].items()}
    return {"arch": arch, "size": size, "layers": cfg.num_layers, "world_size": world_size,
            "rows_per_worker": rows_per_worker, "sequences_per_worker": int(sb.inputs.shape[0]),
            "tokens_per_worker": int(sb.inputs.numel()), "peak_bytes": peak,
            "tflops_per_worker": flops.get_total_flops() / 1e12, "dry_run_wall_s": time.perf_counter() - t0}
