"""Every Dream path on a tiny Dream-layout checkpoint named by its hub id: trajectories, distillation
export, evaluation and serving, each refused without the remote-code flag (the error names it) and
run through Ray with it.

The checkpoint mirrors Dream-org/Dream-v0-Instruct-7B's file list, including the tokenizer class
file ``tokenization_dream.py`` (written by ``official_layout``), and sits in an offline HF cache
that the driver and every Ray worker resolve ``Dream-org/Dream-v0-Instruct-7B`` from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket

import pytest
from official_layout import DREAM_FILES, install_in_hub_cache, write_dream_checkpoint

from d3core.models.tokenizer import RemoteCodeError

ray = pytest.importorskip("ray")

DREAM = "Dream-org/Dream-v0-Instruct-7B"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dream_hub(tmp_path_factory):
    """The offline cache, visible to this process and (through the environment) to Ray's workers."""
    from huggingface_hub import constants

    root = tmp_path_factory.mktemp("dream-hub")
    snapshot = install_in_hub_cache(root / "hf-cache", DREAM, write_dream_checkpoint(root / "dream"))
    env = {"HF_HUB_CACHE": str(root / "hf-cache"), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(root / "modules")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.setattr(constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield snapshot
        finally:
            ray.shutdown()


def test_dream_trajectories_distill_eval_and_serve(dream_hub, tmp_path):
    from pipelines.distill import DistillConfig, run_distill
    from pipelines.evaluate import run_evaluation
    from pipelines.recipes import get_recipe
    from pipelines.trajectories import TrajectoriesConfig
    from pipelines.trajectories import run as trajectories

    assert sorted(p.name for p in dream_hub.iterdir() if not p.name.startswith("model-")) == DREAM_FILES

    # 1. trajectories (Ray Data actors load the hub teacher and its remote-code tokenizer)
    tcfg = dict(out=str(tmp_path / "traj"), teacher=DREAM, n_prompts=16, shard_size=8, num_actors=1, batch_size=8)
    with pytest.raises(RemoteCodeError, match="--trust-remote-code"):
        trajectories(TrajectoriesConfig(**tcfg))
    stats = trajectories(TrajectoriesConfig(**tcfg, trust_remote_code=True))
    assert stats["rows"] == 16 and stats["tokens"] == 16 * 48

    # 2. distillation and export (Ray Train; the student keeps Dream's layout and tokenizer class file)
    student = tmp_path / "student"
    dcfg = dict(trajectories=str(tmp_path / "traj"), out=str(student), only_correct=False, num_workers=2,
                batch_size=8, max_steps=2, ckpt_every=2, window_sizes=(16,), warmup_steps=1, lr=1e-3)
    with pytest.raises(RemoteCodeError, match="--trust-remote-code"):
        run_distill(DistillConfig(**dcfg))
    summary = run_distill(DistillConfig(**dcfg, trust_remote_code=True))
    assert summary["init"] == DREAM and summary["steps"] == 2
    exported = sorted(p.name for p in student.iterdir() if not p.name.startswith("model"))
    code = {"configuration_dream.py", "modeling_dream.py", "generation_utils.py"}  # the hub repo's, via auto_map
    assert exported == sorted({*DREAM_FILES, "distill_summary.json"} - code - {"model.safetensors.index.json"})
    assert (student / "tokenization_dream.py").read_bytes() == (dream_hub / "tokenization_dream.py").read_bytes()
    assert json.loads((student / "config.json").read_text())["auto_map"]["AutoModel"] == \
        f"{DREAM}--modeling_dream.DreamModel"

    # 3. evaluation: teacher (hub id) and student (path), both with Dream's tokenizer
    ecfg = dict(models={"teacher": DREAM, "student": str(student)}, ar_model=None, out=str(tmp_path / "eval"),
                sweeps={"d3llm.entropy_threshold": (0.5,)}, n=4, batch_size=4)
    with pytest.raises(RemoteCodeError, match="--trust-remote-code"):
        run_evaluation(dataclasses.replace(get_recipe("tiny").evaluate, **ecfg))
    report = run_evaluation(dataclasses.replace(get_recipe("tiny").evaluate, **ecfg, trust_remote_code=True))
    assert set(report["aup"]["synthetic"]) == {"teacher/d3llm", "student/d3llm"}
    assert {c["model"] for c in report["cells"]} == {"teacher", "student"}

    # 4. serving the student over HTTP on 127.0.0.1
    import httpx
    from ray import serve

    from serve_apps.openai_app import app_builder

    with pytest.raises(RemoteCodeError, match="trust_remote_code: true"):
        app_builder({"preset": "tiny", "model": str(student)})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app_builder({"preset": "tiny", "model": str(student), "trust_remote_code": True,
                               "model_name": "dream-student"}), name="dream", route_prefix="/")
        messages = [{"role": "user", "content": "ann has 7 apples ."}]
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
                           json={"model": "dream-student", "temperature": 0, "messages": messages})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["usage"]["completion_tokens"] > 0 and isinstance(body["choices"][0]["message"]["content"], str)
    finally:
        serve.shutdown()
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # nothing above reached the network
