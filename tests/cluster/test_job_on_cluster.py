"""The main job on the multi-node cluster: ``ray job submit`` of ``pipelines/full.py --run-dir s3://...`` to the
head's job server, every stage pinned to the worker nodes, the whole run directory on the S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster_env import WORKER, make_bucket, objects, s3

pytestmark = [pytest.mark.cluster, pytest.mark.cluster_full, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
# tests/pipelines/test_full.py's reduced tiny run, with each stage asking for the worker nodes' resource
ARGS = ["--n-prompts", "64", "--distill-steps", "2", "--n-eval", "8", "--sweeps", "d3llm=0.5",
        "--trajectories.resources", WORKER, "0.5", "--distill.resources", WORKER, "1",
        "--evaluate.resources", WORKER, "1"]


def test_job_submit_runs_full_py_on_the_cluster_into_an_s3_run_dir(cluster):
    if not Path(RAY).exists():
        pytest.skip("the ray CLI is not installed next to this interpreter")
    run = make_bucket("d3ray-job") + "/run"
    env = {**os.environ, "RAY_API_SERVER_ADDRESS": cluster.dashboard_url}
    t0 = time.perf_counter()
    # The job's driver runs on the head: sys.executable names this environment there, where d3ray is installed,
    # as on every node of the cluster (the KubeRay image). No --working-dir: the nodes of this cluster share one
    # machine and so one runtime_resources directory, where every node's runtime-env agent unpacks the same
    # package, and a worker node unpacking it removed files under the head's driver mid-run.
    job = subprocess.run([RAY, "job", "submit", "--", sys.executable, str(ROOT / "pipelines" / "full.py"),
                          "--run-dir", run, *ARGS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - t0
    print(f"JOB full.py on the cluster: rc={job.returncode} in {seconds:.0f} s")
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]

    root = run.removeprefix("s3://")
    keys = {k.removeprefix(root + "/") for k in objects(run)}
    stages = json.loads(s3().cat_file(f"{root}/stages.json"))
    assert [stages[s]["status"] for s in ("trajectories", "distill", "evaluate")] == ["done"] * 3
    assert {"recipe.yaml", "report.md", "report.json", "trajectories/manifest.json", "student/model.safetensors",
            "student/distill_summary.json", "student/README.md", "eval/report.json", "eval/aup.png"} <= keys
    assert any(k.startswith("_train/distill/checkpoint-step00000002/") for k in keys)  # Ray Train's storage is S3
    card = s3().cat_file(f"{root}/student/README.md").decode()
    assert "| student/d3llm |" in card  # the evaluation reached the student's card on S3
    recipe = s3().cat_file(f"{root}/recipe.yaml").decode()
    assert "worker: 0.5" in recipe and "worker: 1.0" in recipe
    report = json.loads(s3().cat_file(f"{root}/report.json"))
    assert "d3llm" in report["student_beats_teacher"]["synthetic"]
