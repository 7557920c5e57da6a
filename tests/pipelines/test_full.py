"""End to end: a reduced tiny ``full.py`` submitted as a Ray job to a local head, then rerun (stages skip)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
# The head inherits PATH, so the job's `python` is this interpreter's environment.
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
       "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:8265",
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
ARGS = ["--n-prompts", "64", "--distill-steps", "2", "--n-eval", "8", "--sweeps", "d3llm=0.5"]


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture()
def ray_head():
    if shutil.which(RAY) is None:
        pytest.skip("ray CLI not installed next to this interpreter")
    if _run([RAY, "status", "--address", "127.0.0.1:6379"], 60).returncode == 0:
        pytest.skip("a Ray cluster is already running on 127.0.0.1:6379; not touching it")
    started = _run([RAY, "start", "--head", "--num-cpus=2", "--node-ip-address=127.0.0.1", "--port=6379",
                    "--dashboard-host=127.0.0.1", "--disable-usage-stats"], 180)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        yield
    finally:
        _run([RAY, "stop", "--force"], 120)


def _submit(run_dir: Path, extra: list[str] = ()) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    out = _run([RAY, "job", "submit", "--working-dir", ".", "--", "python", "pipelines/full.py", "--run-dir",
                str(run_dir), *ARGS, *extra], 900)
    return out, time.perf_counter() - t0


@pytest.mark.slow
def test_job_submit_runs_the_pipeline_and_a_rerun_skips_finished_stages(ray_head, tmp_path):
    run_dir = tmp_path / "run"
    first, _ = _submit(run_dir)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    stages = json.loads((run_dir / "stages.json").read_text())
    assert [stages[s]["status"] for s in ("trajectories", "distill", "evaluate")] == ["done"] * 3
    assert (run_dir / "student" / "distill_summary.json").exists()
    report = json.loads((run_dir / "report.json").read_text())
    assert "d3llm" in report["student_beats_teacher"]["synthetic"]
    assert (run_dir / "eval" / "aup.png").read_bytes()[:4] == b"\x89PNG"
    text = (run_dir / "report.md").read_text()
    assert "| trajectories | done |" in text and "## Student vs teacher (AUP)" in text
    card = (run_dir / "student" / "README.md").read_text()  # the publishable student carries the run's AUP
    assert "| student/d3llm |" in card and "Not evaluated yet" not in card and "license: apache-2.0" in card

    shard_times = {p.name: p.stat().st_mtime_ns for p in (run_dir / "trajectories").glob("*.parquet")}
    student_time = (run_dir / "student" / "model.safetensors").stat().st_mtime_ns
    second, _ = _submit(run_dir)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    again = json.loads((run_dir / "stages.json").read_text())
    for stage in ("trajectories", "distill", "evaluate"):
        assert again[stage]["seconds"] == stages[stage]["seconds"]  # the first run's time is kept
        assert "rechecked_seconds" in again[stage]
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "trajectories").glob("*.parquet")} == shard_times
    assert (run_dir / "student" / "model.safetensors").stat().st_mtime_ns == student_time
    recipe = (run_dir / "recipe.yaml").read_text()  # the resolved recipe, saved in the run dir
    assert "n_prompts: 64" in recipe and "max_steps: 2" in recipe and "d3llm.entropy_threshold:" in recipe

    # a rerun with other settings into the same run dir refuses, names the field and the ways out, touches nothing
    third, _ = _submit(run_dir, ["--n-prompts", "90"])
    assert third.returncode != 0
    out = third.stdout + third.stderr
    assert "prompts.count: 64 -> 90" in out and "--overwrite trajectories" in out and "--run-dir" in out, out[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "trajectories").glob("*.parquet")} == shard_times
    assert (run_dir / "student" / "model.safetensors").stat().st_mtime_ns == student_time
    assert (run_dir / "recipe.yaml").read_text() == recipe  # still the recipe of what the run dir holds


def test_bad_arguments_fail_before_any_stage(tmp_path):
    from pipelines.full import FullConfig, parse_args

    with pytest.raises(ValueError, match="unknown stage"):
        FullConfig(skip=("distil",))
    with pytest.raises(ValueError, match="needs --prompts"):
        parse_args(["--preset", "llada-8b"])
    with pytest.raises(ValueError, match="sweep 'd3llm=x'"):
        parse_args(["--sweeps", "d3llm=x"])


def test_card_evaluation_lists_every_system_and_task():
    from pipelines.run_report import card_evaluation

    report = {"aup": {"gsm8k": {"teacher/d3llm": 71.25, "student/d3llm": 80.5}, "mbpp": {"student/d3llm": 40.0}},
              "meta": {"n": 8, "gen_length": 256, "block_length": 32, "hardware": "NVIDIA H100"}}
    text = card_evaluation(report)
    assert "| system | gsm8k | mbpp |" in text
    assert "| student/d3llm | 80.5 | 40.0 |" in text and "| teacher/d3llm | 71.2 | - |" in text
    assert "8 problems per task, generation length 256, block 32, on NVIDIA H100" in text
