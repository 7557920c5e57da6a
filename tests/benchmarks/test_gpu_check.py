"""The prepared device check runs end to end here in its smoke form (GPU tests skip, a tiny CPU decode)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="on a GPU machine run the real check")
def test_the_gpu_check_script_writes_one_json_with_tests_and_decode(tmp_path):
    env = {**os.environ, "GPU_CHECK_SMOKE": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["ok"] and result["tests"]["rc"] == 0
    assert result["tests"]["tests"] == result["tests"]["skipped"] > 10  # no CUDA here: every GPU test skips
    scripted = result["decode"]["scripted"]
    assert [r["batch"] for r in scripted] == [1, 8]
    assert all(r["steps"] == r["schedule_steps"] and r["flops_per_step"] > 0 for r in scripted)


def test_gpu_decode_refuses_a_decode_that_falls_behind_the_schedule(monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    import gpu_decode
    from d3core.samplers.d3llm import D3LLMParams

    model = gpu_decode.random_model("tiny", 1, torch.device("cpu"), torch.float32)
    params = D3LLMParams(gen_length=48, block_length=16, threshold=0.5, cache_delay_iter=1, early_stop=False)
    monkeypatch.setattr(gpu_decode, "schedule_steps", lambda *a, **k: 3)  # fewer steps than the decode takes
    with pytest.raises(RuntimeError, match="steps where the scripted schedule takes 3"):
        gpu_decode.time_decode(model, gpu_decode.scripted_program(9), params, 1, 16, 1, torch.device("cpu"), 9, model)
