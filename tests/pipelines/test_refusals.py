"""Refusals that name the fix and leave nothing behind (issue 33, item 7), without starting Ray.

A missing fsspec implementation names the extra that installs it; ``--ar-model none`` is no AR
baseline; a refused run writes nothing into its output or run directory; an explicit ``--epochs``
is not silently overridden by the preset's ``max_steps``. Where a check needs Ray (the GPU count),
Ray is replaced by a CPU-only cluster's answers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import ray
from fsspec.registry import _registry as fsspec_registry

from d3core import trajectory as T
from d3core.models.shipped import TINY_TEACHER_DIR
from pipelines import cli, full
from pipelines import distill as D
from pipelines import evaluate as E
from pipelines import trajectories as P
from trajectory_sets import random_rows, write_set

ROOT = Path(__file__).resolve().parents[2]
TEACHER = str(TINY_TEACHER_DIR)
GEN = 16




@pytest.fixture
def no_s3fs_gcsfs(monkeypatch):
    """As if neither s3fs nor gcsfs were installed (importing them fails; none is registered yet)."""
    for module in ("s3fs", "gcsfs"):
        monkeypatch.setitem(sys.modules, module, None)
    for protocol in ("s3", "s3a", "gs", "gcs"):
        monkeypatch.delitem(fsspec_registry, protocol, raising=False)


@pytest.fixture
def cpu_cluster(monkeypatch):
    """Ray "running" with 2 CPUs and no GPU, without starting it."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local cluster: no wait for autoscaling
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})


# -- missing filesystems ----------------------------------------------------------------------------
@pytest.mark.parametrize("parse, argv, extra", [
    (cli.parse_trajectories, ["--out", "s3://bucket/x"], "s3"),
    (cli.parse_trajectories, ["--prompts", "gs://bucket/p.jsonl"], "gcs"),
    (cli.parse_distill, ["--trajectories", "s3://bucket/traj"], "s3"),
    (cli.parse_evaluate, ["--out", "s3://bucket/eval"], "s3"),
    (full.parse_args, ["--run-dir", "s3://bucket/run"], "s3"),
    (full.parse_args, ["--run-dir", "gs://bucket/run"], "gcs"),
])
def test_a_missing_filesystem_names_the_extra_to_install(no_s3fs_gcsfs, parse, argv, extra):
    with pytest.raises(ValueError, match=rf"{argv[1]!r}: .* not installed: pip install -e '\.\[{extra}\]'"):
        parse(argv)


def test_a_missing_filesystem_is_exit_2_with_one_line_before_ray(tmp_path):
    code = ("import sys; sys.modules['s3fs'] = None; from pipelines.cli import main; "
            "main('trajectories', ['--out', 's3://bucket/x', '--n-prompts', '4'])")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "",
                               "HOME": str(tmp_path)})
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [("error: out='s3://bucket/x': s3:// needs s3fs, which is not installed: pip install -e '.[s3]' "
                       "(or pip install s3fs)")]
    assert "Traceback" not in done.stderr and "Started a local Ray instance" not in done.stderr


# -- --ar-model none --------------------------------------------------------------------------------
@pytest.mark.parametrize("word", ["none", "NONE", "None"])
def test_ar_model_none_means_no_ar_baseline(word, tmp_path):
    assert cli.parse_evaluate(["--ar-model", word])[0].ar_model is None
    recipe = full.parse_args(["--ar-model", word]).recipe
    assert recipe.ar_model is None and recipe.evaluate.ar_model is None
    config = tmp_path / "c.yaml"
    config.write_text(f"ar_model: {word}\n")
    assert cli.parse_evaluate(["--config", str(config)])[0].ar_model is None
    assert full.parse_args(["--config", str(config)]).recipe.ar_model is None


# -- a refusal leaves nothing behind ----------------------------------------------------------------
def test_full_with_a_missing_teacher_writes_no_recipe(tmp_path):
    run_dir = tmp_path / "run"
    cfg = full.parse_args(["--teacher", "/nonexistent", "--run-dir", str(run_dir), "--n-prompts", "8"])
    with pytest.raises(ValueError, match=r"teacher='/nonexistent': no config.json"):
        full.run(cfg)
    assert not run_dir.exists()


def test_full_refuses_gpus_the_cluster_lacks_before_writing(tmp_path, cpu_cluster):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = full.parse_args(["--run-dir", str(run_dir), "--skip", "trajectories,distill",
                           "--evaluate.num-gpus-per-cell", "1"])
    with pytest.raises(ValueError, match=r"evaluate.num_gpus_per_cell=1 but the Ray cluster has 0 GPU"):
        full.run(cfg)
    assert list(run_dir.iterdir()) == []


def test_trajectories_refuse_gpus_the_cluster_lacks_before_writing(tmp_path, cpu_cluster):
    out = tmp_path / "traj"
    cfg, overwrite = cli.parse_trajectories(["--out", str(out), "--n-prompts", "4", "--num-gpus-per-actor", "1"])
    with pytest.raises(ValueError, match=r"num_gpus_per_actor=1 but the Ray cluster has 0 GPU"):
        P.run(cfg, overwrite)
    assert not out.exists()


def test_distill_refuses_gpus_the_cluster_lacks_before_writing(tmp_path, cpu_cluster):
    write_set(str(tmp_path / "traj"), random_rows(16, TEACHER, GEN), TEACHER, GEN)
    cfg = D.DistillConfig(trajectories=str(tmp_path / "traj"), out=str(tmp_path / "student"), batch_size=8,
                          window_sizes=(8,), use_gpu=True)
    with pytest.raises(ValueError, match=r"num_workers \(use_gpu=True\)=2 but the Ray cluster has 0 GPU"):
        D.run_distill(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["traj"]  # no student, no _train storage record


def test_evaluate_refuses_gpus_the_cluster_lacks_before_writing(tmp_path, cpu_cluster):
    out = tmp_path / "eval"
    cfg, overwrite = cli.parse_evaluate(["--out", str(out), "--n", "4", "--num-gpus-per-cell", "1"])
    with pytest.raises(ValueError, match=r"num_gpus_per_cell=1 but the Ray cluster has 0 GPU"):
        E.run_evaluation(cfg, overwrite)
    assert not out.exists()


# -- --epochs and the preset's max_steps ------------------------------------------------------------
def test_an_explicit_epochs_wins_over_the_presets_max_steps():
    assert cli.parse_distill([])[0].max_steps == 350  # the tiny preset's length
    cfg = cli.parse_distill(["--epochs", "2"])[0]
    assert (cfg.epochs, cfg.max_steps) == (2, None) and D.plan(cfg, 80) == (2 * (80 // 32), 80 // 32)
    assert cli.parse_distill(["--epochs=2"])[0].max_steps is None
    assert cli.parse_distill(["--max-steps", "7"])[0].max_steps == 7
    recipe = full.parse_args(["--distill.epochs", "2"]).recipe
    assert (recipe.distill.epochs, recipe.distill.max_steps) == (2, None)


@pytest.mark.parametrize("parse, argv", [
    (lambda a: cli.parse_distill(a)[0], ["--epochs", "2", "--max-steps", "7"]),
    (lambda a: cli.parse_distill(a)[0], ["--max_steps=7", "--epochs", "2"]),
    (full.parse_args, ["--distill.epochs", "2", "--distill-steps", "7"]),
])
def test_epochs_and_max_steps_together_are_refused_naming_both_ways(parse, argv):
    flag = "--distill." if parse is full.parse_args else "--"
    with pytest.raises(ValueError, match=rf"{flag}epochs 2 with {flag}max-steps 7: .*{flag}epochs N for N passes "
                                         rf".*{flag}max-steps S"):
        parse(argv)


def test_a_saved_recipe_with_both_keeps_its_steps_and_epochs_over_it_wins(tmp_path):
    from pipelines import _cli

    path = tmp_path / "recipe.yaml"
    path.write_text(_cli.to_yaml(full.parse_args([]).bound()))  # every field, max_steps: 350 and epochs: 5
    assert cli.parse_distill(["--config", str(path)])[0].max_steps == 350
    assert cli.parse_distill(["--config", str(path), "--epochs", "3"])[0].max_steps is None


def test_full_asks_no_gpus_for_a_finished_stage(tmp_path, cpu_cluster):
    run_dir = tmp_path / "run"
    cfg = full.parse_args(["--run-dir", str(run_dir), "--skip", "distill,evaluate",
                           "--trajectories.num-gpus-per-actor", "1"])
    with pytest.raises(ValueError, match=r"trajectories.num_gpus_per_actor=1 but the Ray cluster has 0 GPU"):
        full.check_gpus(cfg, cfg.bound())
    (run_dir / "trajectories").mkdir(parents=True)
    (run_dir / "trajectories" / T.MANIFEST).write_text('{"complete": true}')
    full.check_gpus(cfg, cfg.bound())  # kept as it is: nothing to decode, no GPU needed
    redo = full.parse_args(["--run-dir", str(run_dir), "--skip", "distill,evaluate", "--overwrite", "trajectories",
                            "--trajectories.num-gpus-per-actor", "1"])
    with pytest.raises(ValueError, match=r"num_gpus_per_actor=1 but the Ray cluster has 0 GPU"):
        full.check_gpus(redo, redo.bound())
