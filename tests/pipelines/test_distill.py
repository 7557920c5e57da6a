"""Ray Train distillation: 1 vs 2 workers give the same loss and update; a killed worker resumes exactly from
the newest checkpoint on disk; the same command gives the same student bit for bit; sharded checkpoints reshard
between worker counts."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from d3core import trajectory as T
from d3core.models.checkpoint import load_pretrained, save_pretrained
from d3core.models.registry import build_model
from d3core.models.tiny_tokenizer import save_tokenizer
from faults import Both, KillWorker, SlowStart, SlowSteps, ship_by_value
from trajectory_sets import write_set

ray = pytest.importorskip("ray")

GEN = 16


@pytest.fixture(scope="module")
def ray_local():
    ship_by_value()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher")
    model = build_model("llada", "tiny", seed=0, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                        intermediate_size=64)
    save_pretrained(model, str(d))
    save_tokenizer(str(d))
    return str(d)


def make_rows(n: int, teacher: str, vocab: int, seed: int = 0) -> list[T.TrajectoryRow]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = [rng.randrange(10, vocab) for _ in range(rng.randint(3, 9))]
        steps = list(range(GEN))
        rng.shuffle(steps)
        rows.append(T.TrajectoryRow(
            id=f"row-{i:03d}", prompt_ids=prompt, response_ids=[rng.randrange(10, vocab) for _ in range(GEN)],
            unmask_step=steps, is_correct=True, attempts=1, temperature=0.0, teacher=teacher, sampler="vanilla",
            sampler_params="{}"))
    return rows


def write_rows(traj, teacher_dir: str, n: int, seed: int, shard_size: int | None = None) -> None:
    vocab = load_pretrained(teacher_dir).config.vocab_size
    write_set(str(traj), make_rows(n, teacher_dir, vocab, seed=seed), teacher_dir, GEN, shard_size=shard_size)


def student_state(out) -> dict:
    return load_pretrained(str(out)).state_dict()


def test_two_workers_equal_one(ray_local, teacher_dir, tmp_path):
    """The real train_loop: the same global batches, so the same losses and the same student on 1 and 2 workers."""
    from pipelines.distill import DistillConfig, run_distill

    traj = tmp_path / "traj"
    write_rows(traj, teacher_dir, 16, seed=4)
    results = {}
    for workers in (1, 2):
        out = tmp_path / f"student-{workers}"
        cfg = DistillConfig(trajectories=str(traj), out=str(out), num_workers=workers, batch_size=8, max_steps=2,
                            lr=1e-2, warmup_steps=0, window_sizes=(8,), ckpt_every=2, grad_clip=1e9)
        results[workers] = run_distill(cfg)
    h1, h2 = results[1]["history"], results[2]["history"]
    for step in range(2):
        for key in ("loss", "ce", "ce_rev", "ent", "grad_norm"):
            assert h2[step][key] == pytest.approx(h1[step][key], rel=1e-4, abs=1e-6), (step, key)
    assert h1[0]["loss"] > 0 and h1[0]["grad_norm"] > 0
    one, two, initial = student_state(tmp_path / "student-1"), student_state(tmp_path / "student-2"), \
        load_pretrained(teacher_dir).state_dict()
    moved = 0
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-5)
        moved += int(not torch.equal(value, initial[name]))
    assert moved == len(one)  # the steps changed every parameter, identically on 1 and 2 workers


def test_worker_killed_right_after_a_checkpoint_resumes_from_it(ray_local, teacher_dir, tmp_path):
    """Killed 1 step after checkpoint 2, before Ray's controller registered it: the restart resumes from it."""
    from pipelines.distill import DistillConfig, read_summary, run_distill
    from pipelines.train_checkpoint import list_checkpoints

    traj = tmp_path / "traj"
    write_rows(traj, teacher_dir, 40, seed=1, shard_size=20)
    out = tmp_path / "student"
    cfg = DistillConfig(trajectories=str(traj), out=str(out), num_workers=2, batch_size=8, epochs=2, lr=1e-3,
                        warmup_steps=1, window_sizes=(8,), ckpt_every=2, max_failures=1)
    summary = run_distill(cfg, hooks=KillWorker(step=3, marker=str(tmp_path / "fault-fired")))
    assert (tmp_path / "fault-fired").exists()  # a worker really died at step 3
    assert summary["steps"] == summary["max_steps"] == 10  # 40 rows / 8 per step, 2 epochs
    assert summary["resumed_from"] == [2]  # from the step-2 checkpoint on disk, registered or not
    assert summary["optimizer_steps"] == 10  # AdamW state came back with the weights (not restarted at 2)
    # every row used exactly once per epoch despite the restart from the step-2 checkpoint
    assert summary["row_uses"] == {"rows_used": 40, "min": 2, "max": 2}
    assert len(list_checkpoints(cfg.experiment_uri)) <= cfg.num_to_keep  # pruned, the unregistered one too
    student = load_pretrained(str(out))
    teacher = load_pretrained(teacher_dir)
    assert any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(), teacher.state_dict().values()))
    assert (out / "tokenizer.json").exists()
    # rerun: the stage is done, nothing retrains
    assert read_summary(str(out))["steps"] == 10
    again = run_distill(cfg)
    assert again["train_seconds"] == summary["train_seconds"]
    assert json.loads((out / "distill_summary.json").read_text())["rows"] == 40


@pytest.mark.slow
def test_the_same_command_twice_gives_the_same_student_bit_for_bit(ray_local, teacher_dir, tmp_path):
    """Which rows reach which worker through Ray Data depends on timing; the global batches do not.

    The first run's rank 0 reaches the dataset late, the second run's rank 1 (and its rank 0 is slow every step).
    """
    from pipelines.distill import DistillConfig, run_distill

    traj = tmp_path / "traj"
    write_rows(traj, teacher_dir, 48, seed=5, shard_size=8)
    students = []
    for run, hooks in enumerate((SlowStart(seconds=4.0, rank=0), Both(SlowStart(seconds=4.0, rank=1),
                                                                      SlowSteps(seconds=0.5, rank=0)))):
        out = tmp_path / f"student-{run}"
        cfg = DistillConfig(trajectories=str(traj), out=str(out), num_workers=2, batch_size=8, max_steps=6,
                            lr=1e-3, warmup_steps=1, window_sizes=(8,), ckpt_every=6)
        run_distill(cfg, hooks=hooks)
        students.append((out / "model.safetensors").read_bytes())
    assert students[0] == students[1]


def test_config_errors_name_the_value(tmp_path):
    from pipelines.distill import DistillConfig, prepare

    with pytest.raises(ValueError, match="batch_size=9 is not divisible by num_workers=2"):
        DistillConfig(batch_size=9, num_workers=2)
    with pytest.raises(ValueError, match="masking='foo'"):
        DistillConfig(masking="foo")
    with pytest.raises(ValueError, match="no manifest.json there"):
        prepare(DistillConfig(trajectories=str(tmp_path / "none")))


def test_lora_run_exports_merged_official_weights(ray_local, teacher_dir, tmp_path):
    pytest.importorskip("peft")
    from pipelines.distill import DistillConfig, run_distill

    traj = tmp_path / "traj"
    write_rows(traj, teacher_dir, 16, seed=2)
    out = tmp_path / "student"
    cfg = DistillConfig(trajectories=str(traj), out=str(out), num_workers=2, batch_size=8, max_steps=3, lr=1e-2,
                        warmup_steps=1, window_sizes=(8,), ckpt_every=3, lora_rank=4, lora_targets=("q", "v"))
    assert run_distill(cfg)["steps"] == 3
    student, teacher = load_pretrained(str(out)), load_pretrained(teacher_dir)  # official layout, adapters merged
    changed = {name for (name, a), b in zip(student.state_dict().items(), teacher.state_dict().values())
               if not torch.equal(a, b)}
    assert changed == {f"layers.{i}.attn.{m}.weight" for i in range(2) for m in ("q", "v")}


def test_sharded_checkpoints_reshard_between_worker_counts(ray_local, teacher_dir, tmp_path):
    """DCP checkpoint saved by 2 FSDP2 workers loads exactly on 1 worker, and one saved by 1 loads on 2."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def train_fn(config):  # nested, and importing what it needs: Ray ships it by value
        import os
        import tempfile

        import ray.train
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        def full_states(model, optimizer) -> dict:
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return {"model": get_model_state_dict(model, options=opts),
                    "optim": get_optimizer_state_dict(model, optimizer, options=opts).get("state", {})}  # rank 0 only

        from d3core.models.checkpoint import load_pretrained
        from pipelines.distill_worker import shard_model, world
        from pipelines.train_checkpoint import load_checkpoint, save_checkpoint

        rank, size = world()
        model = shard_model(load_pretrained(config["init"]).train(), use_gpu=False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        out = {"world": size}
        if config.get("load"):
            out["trainer_state"] = load_checkpoint(config["load"], model, optimizer)
            out["loaded"] = full_states(model, optimizer)
        else:
            ids = torch.arange(24).reshape(2, 12) % 40 + 10
            model(ids).float().pow(2).mean().backward()  # same batch on every rank: a deterministic update
            optimizer.step()
            optimizer.zero_grad()
        out["saved"] = full_states(model, optimizer)
        if rank == 0:
            torch.save(out, config["dump"])
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(d, model, optimizer, {"step": 1, "world_size": size})
            if rank == 0:
                assert os.path.exists(f"{d}/trainer_state.json")
            ray.train.report({"step": 1}, checkpoint=ray.train.Checkpoint.from_directory(d))

    def fit(name, workers, load=None):
        dump = tmp_path / f"{name}.pt"
        result = TorchTrainer(
            train_fn, train_loop_config={"init": teacher_dir, "dump": str(dump), "load": load},
            scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=name, storage_path=str(tmp_path / "storage"))).fit()
        files = sorted(p.name for p in Path(result.checkpoint.path).iterdir())
        return torch.load(dump, weights_only=False), result.checkpoint.path, files

    two, two_ckpt, two_files = fit("save-2", 2)
    # each rank wrote its own shard file; no rank gathered the whole state, no single pickle
    assert two_files == [".metadata", "__0_0.distcp", "__1_0.distcp", "trainer_state.json"]
    one, one_ckpt, one_files = fit("load-1", 1, load=two_ckpt)
    assert one["world"] == 1 and one["trainer_state"] == {"step": 1, "world_size": 2}
    back, _, _ = fit("load-2", 2, load=one_ckpt)
    for expected, got in ((two["saved"], one["loaded"]), (one["saved"], back["loaded"])):
        assert set(got["model"]) == set(expected["model"]) and len(got["model"]) > 10
        for name, value in expected["model"].items():
            assert torch.equal(got["model"][name], value), name
        assert set(got["optim"]) == set(expected["optim"])
        for name, moments in expected["optim"].items():
            assert int(moments["step"]) == 1
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(got["optim"][name][key], moments[key]), (name, key)
    assert any(v.abs().sum() > 0 for m in two["saved"]["optim"].values() for v in (m["exp_avg"],))


def test_two_worker_checkpoint_resumes_on_one_worker(ray_local, teacher_dir, tmp_path):
    """A 2-worker run dies 1 step after its step-2 checkpoint; rerun on 1 worker, it continues from there."""
    import ray.train

    from pipelines.distill import DistillConfig, run_distill

    traj = tmp_path / "traj"
    write_rows(traj, teacher_dir, 40, seed=3)
    out = tmp_path / "student"
    common = dict(trajectories=str(traj), out=str(out), batch_size=8, epochs=2, lr=1e-3, warmup_steps=1,
                  window_sizes=(8,), ckpt_every=2, max_failures=0)
    with pytest.raises(ray.train.TrainingFailedError):
        run_distill(DistillConfig(num_workers=2, **common), hooks=KillWorker(step=3, marker=str(tmp_path / "fault")))
    assert (tmp_path / "fault").exists() and not (out / "distill_summary.json").exists()
    summary = run_distill(DistillConfig(num_workers=1, **common))
    assert summary["resumed_from"] == [2]
    workers = [h["workers"] for h in summary["history"]]
    assert [h["step"] for h in summary["history"]] == list(range(1, 11))
    assert workers == [2, 2] + [1] * 8  # steps 1-2 from the 2-worker checkpoint, the rest on 1 worker
    assert summary["optimizer_steps"] == 10  # AdamW state resharded onto 1 worker, not restarted
    assert summary["row_uses"] == {"rows_used": 40, "min": 2, "max": 2}  # no row lost or doubled
    files = sorted(p.name for p in out.iterdir())
    assert "_train" not in files and not any(f.endswith((".distcp", ".pt")) for f in files)
    assert load_pretrained(str(out)).config == load_pretrained(teacher_dir).config


def _fake_checkpoint(root: Path, step: int, digest: str) -> Path:
    import torch.distributed.checkpoint as dcp

    d = root / f"checkpoint-step{step:08d}"
    dcp.save({"model": {"w": torch.full((64,), float(step))}}, checkpoint_id=str(d), no_dist=True)
    (d / "trainer_state.json").write_text(json.dumps({"step": step, "fingerprint_digest": digest}))
    return d


def test_reconcile_picks_the_newest_complete_checkpoint_on_disk_and_prunes(tmp_path):
    """Ray knows step 2 only; step 4 is complete but unregistered; step 6 lost a shard; step 8 is another run's."""
    from pipelines.train_checkpoint import RAY_SNAPSHOT, list_checkpoints, reconcile

    run = tmp_path / "distill"
    for step in (1, 2, 4, 6):
        _fake_checkpoint(run, step, "mine")
    _fake_checkpoint(run, 8, "someone-else")
    for f in (run / "checkpoint-step00000006").glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:10])  # a rank died mid-upload: its file is short
    (run / RAY_SNAPSHOT).write_text(json.dumps({"checkpoint_results": [
        {"checkpoint_dir_name": "checkpoint-step00000001"}, {"checkpoint_dir_name": "checkpoint-step00000002"}]}))
    newest = reconcile(str(run), "mine", num_to_keep=2)
    assert newest == str(run / "checkpoint-step00000004")
    left = [p.rsplit("/", 1)[-1] for p in list_checkpoints(str(run))]
    # registered ones are Ray's to delete; the short one and the foreign one are gone; step 4 is kept
    assert left == ["checkpoint-step00000001", "checkpoint-step00000002", "checkpoint-step00000004"]
    (run / RAY_SNAPSHOT).write_text(json.dumps({"checkpoint_results": [
        {"checkpoint_dir_name": "checkpoint-step00000004"}]}))  # after the next registration
    assert reconcile(str(run), "mine", num_to_keep=2) == str(run / "checkpoint-step00000004")
    assert [p.rsplit("/", 1)[-1] for p in list_checkpoints(str(run))] == ["checkpoint-step00000002",
                                                                         "checkpoint-step00000004"]


@pytest.mark.slow
def test_a_driver_killed_right_after_a_checkpoint_resumes_from_it(ray_local, teacher_dir, tmp_path):
    """SIGKILL of the distill driver as soon as a checkpoint lands on disk; the rerun continues from that one."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from pipelines.distill import DistillConfig, run_distill
    from pipelines.fingerprint import read_record
    from pipelines.train_checkpoint import list_checkpoints, newest_complete

    traj, out = tmp_path / "traj", tmp_path / "student"
    write_rows(traj, teacher_dir, 40, seed=6)
    common = dict(trajectories=str(traj), out=str(out), num_workers=2, batch_size=8, max_steps=20, lr=1e-3,
                  warmup_steps=1, window_sizes=(8,), ckpt_every=2)  # max_steps sets the length (epochs: the default)
    cfg = DistillConfig(**common)  # the CLI below starts from the tiny recipe: every value it differs in is a flag
    cmd = [sys.executable, str(Path(__file__).resolve().parents[2] / "pipelines" / "distill.py"),
           "--trajectories", str(traj), "--out", str(out), "--num-workers", "2", "--batch-size", "8",
           "--max-steps", "20", "--lr", "1e-3", "--warmup-steps", "1", "--window-sizes", "8", "--ckpt-every", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    try:
        while time.time() < deadline and proc.poll() is None:
            digest = (read_record(cfg.storage_path) or {}).get("digest")
            if digest and any(Path(c, "trainer_state.json").exists() and "00000004" in c
                              for c in list_checkpoints(cfg.experiment_uri)):
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    # The driver joined the test's Ray cluster, which stops its workers only after the driver is gone:
    # one may still land a checkpoint. Wait (bounded) until the disk holds still, then read the newest.
    newest, settle_deadline, still_since = None, time.time() + 120, time.time()
    while time.time() < settle_deadline and time.time() - still_since < 5:
        now = newest_complete(cfg.experiment_uri, digest)
        if now != newest:
            newest, still_since = now, time.time()
        time.sleep(0.5)
    assert newest is not None and not (out / "distill_summary.json").exists(), "the driver should die mid-run"
    step = int(newest.rsplit("step", 1)[-1])
    assert step >= 4
    summary = run_distill(cfg)
    assert summary["resumed_from"] == [step]  # the newest checkpoint on disk, whether Ray registered it or not
    assert summary["steps"] == 20 and summary["row_uses"] == {"rows_used": 40, "min": 4, "max": 4}
    assert len(list_checkpoints(cfg.experiment_uri)) <= cfg.num_to_keep
