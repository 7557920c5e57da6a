"""Node loss during distillation: 2 FSDP2 workers on 2 worker nodes, one node killed after checkpoint 4.

Ray Train's ``FailureConfig`` restarts the worker group on the surviving node and a replacement node;
rank 0 reads the newest complete checkpoint from S3 (``train_checkpoint.reconcile``), and the loss
curve from there on is the uninterrupted run's (the 1-vs-2-worker tolerance of
tests/pipelines/test_distill.py). The teacher, the trajectories, the checkpoints and the student all
live on the S3 server: a replacement node finds everything it needs there.
"""

from __future__ import annotations

import random

import pytest

from cluster_env import (WORKER, alive_worker_node_ids, make_bucket, nodes_of_actors, objects, s3,
                         wait_until)
from node_loss import Background, report

pytestmark = [pytest.mark.cluster, pytest.mark.cluster_full, pytest.mark.slow]

GEN = 16
LOSS_KEYS = ("loss", "ce", "ce_rev", "ent", "grad_norm")


def teacher_on_s3(bucket: str, local) -> str:
    """A small LLaDA-layout teacher (as in tests/pipelines/test_distill.py), uploaded to ``bucket/teacher``."""
    from d3core.models.checkpoint import save_pretrained
    from d3core.models.registry import build_model
    from d3core.models.tiny_tokenizer import save_tokenizer

    model = build_model("llada", "tiny", seed=0, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                        intermediate_size=64)
    save_pretrained(model, str(local))
    save_tokenizer(str(local))
    s3().put(str(local), f"{bucket.removeprefix('s3://')}/teacher", recursive=True)
    return f"{bucket}/teacher"


def rows(n: int, teacher: str, vocab: int, seed: int):
    from d3core import trajectory as T

    rng = random.Random(seed)
    out = []
    for i in range(n):
        steps = list(range(GEN))
        rng.shuffle(steps)
        out.append(T.TrajectoryRow(
            id=f"row-{i:03d}", prompt_ids=[rng.randrange(10, vocab) for _ in range(rng.randint(3, 9))],
            response_ids=[rng.randrange(10, vocab) for _ in range(GEN)], unmask_step=steps, is_correct=True,
            attempts=1, temperature=0.0, teacher=teacher, sampler="vanilla", sampler_params="{}"))
    return out


def test_a_worker_node_lost_mid_distillation_resumes_from_s3_on_a_replacement(cluster, tmp_path):
    from d3core.models.checkpoint import load_config
    from faults import Both
    from pipelines import fingerprint as F
    from pipelines.distill import DistillConfig, run_distill
    from pipelines.train_checkpoint import checkpoint_dir_name, newest_complete
    from stage_hooks import PauseOnce, RecordNode, ship_by_value
    from trajectory_sets import write_set

    ship_by_value()
    bucket = make_bucket("d3ray-distill-loss")
    teacher = teacher_on_s3(bucket, tmp_path / "teacher")
    write_set(f"{bucket}/traj", rows(40, teacher, load_config(teacher).vocab_size, seed=1), teacher, GEN,
              shard_size=20)
    common = dict(trajectories=f"{bucket}/traj", num_workers=2, resources={WORKER: 1}, batch_size=8, epochs=2,
                  lr=1e-3, warmup_steps=1, window_sizes=(8,), ckpt_every=2, max_failures=2)
    reference = run_distill(DistillConfig(out=f"{bucket}/ref/student", storage=f"{bucket}/ref/_train", **common))

    cfg = DistillConfig(out=f"{bucket}/lost/student", storage=f"{bucket}/lost/_train", **common)
    pause = PauseOnce(step=4, marker=str(tmp_path / "paused"))
    stage = Background(lambda: run_distill(cfg, hooks=Both(pause, RecordNode(f"{bucket}/lost/nodes"))))
    wait_until(lambda: stage.done() or all((tmp_path / f"paused.rank{r}").exists() for r in range(2)), 300,
               "both ranks paused after step 4")
    digest = F.read_record(cfg.storage_path)["digest"]
    newest = wait_until(lambda: stage.done() or newest_complete(cfg.experiment_uri, digest), 60,
                        "checkpoint 4 complete on S3")
    assert not stage.done() and newest.endswith(checkpoint_dir_name(4)), newest
    before = set(alive_worker_node_ids())
    trained_on = set(nodes_of_actors(cluster, "RayTrainWorker").values()) & before
    assert len(trained_on) == 2, trained_on  # one worker per worker node
    victim = sorted(trained_on)[0]
    removed_at = cluster.remove(victim)
    cluster.add_worker()
    replacement = wait_until(lambda: alive_worker_node_ids() - before, 120, "the replacement node")
    summary = stage.result(timeout_s=600)
    seconds_after = stage.finished - removed_at

    ref, got = reference["history"], summary["history"]
    worst = max(abs(g[k] - r[k]) / max(abs(r[k]), 1e-6) for r, g in zip(ref, got) for k in LOSS_KEYS)
    ran_on = {k.rsplit("/", 1)[-1]: s3().cat_file(k).decode() for k in objects(f"{bucket}/lost/nodes")}
    record = report("distill", removed=f"worker node {victim[:8]} (FSDP2 rank on it)",
                    when="after checkpoint 4 of 10 steps, both ranks at step 4", resumed_from=summary["resumed_from"],
                    steps=summary["steps"], row_uses=summary["row_uses"], worst_relative_loss_difference=worst,
                    restarted_on_replacement=any(n in replacement for n in ran_on.values()),
                    seconds_from_removal_to_done=round(seconds_after, 1))
    assert summary["resumed_from"] == [4]  # the newest checkpoint in the object store
    assert summary["steps"] == summary["max_steps"] == 10 and summary["optimizer_steps"] == 10
    assert summary["row_uses"] == {"rows_used": 40, "min": 2, "max": 2}  # each row once per epoch, none redone twice
    assert len(got) == len(ref) == 10
    for step, (r, g) in enumerate(zip(ref, got)):
        for key in LOSS_KEYS:
            assert g[key] == pytest.approx(r[key], rel=1e-4, abs=1e-6), (step, key)
    assert {"rank-0-attempt-0", "rank-1-attempt-0", "rank-0-attempt-1", "rank-1-attempt-1"} <= set(ran_on)
    assert record["restarted_on_replacement"], (ran_on, replacement)
    assert victim not in {ran_on["rank-0-attempt-1"], ran_on["rank-1-attempt-1"]}
