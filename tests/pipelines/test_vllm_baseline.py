"""The AR baseline through vLLM (the separate environment scripts/vllm_cpu_venv.sh builds) gets d3core's `ar` tokens.

CI builds that environment first (.ci/run) and points D3RAY_VLLM_PYTHON at it; then this test must
run. Elsewhere it runs when .venv-vllm exists and skips, saying why, when it does not.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
from pathlib import Path

import pytest

from d3core.eval.vllm_ar import CPU_ENV
from d3core.models.shipped import TINY_AR_DIR, TINY_TEACHER_DIR
from pipelines import eval_cell
from pipelines import evaluate as ev
from pipelines.sweeps import ar_point

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
CELL_TIMEOUT_S = 900
N = {"synthetic": 24, "gsm8k": 3}


def _vllm_python() -> Path | None:
    named = os.environ.get("D3RAY_VLLM_PYTHON")
    if named:
        return Path(named)
    return DEFAULT_PYTHON if DEFAULT_PYTHON.exists() else None


def _skip_reason() -> str:
    why = os.environ.get("D3RAY_VLLM_UNAVAILABLE")
    return (f"vLLM cannot be installed here: {why}" if why else
            "no vLLM environment: run `bash scripts/vllm_cpu_venv.sh` (CI does) or set D3RAY_VLLM_PYTHON")


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_vllm_python() is None, reason=_skip_reason())]


def _config(tmp_path, use_vllm: str, n: int) -> ev.EvaluateConfig:
    return ev.EvaluateConfig(models={"teacher": str(TINY_TEACHER_DIR)}, ar_model=str(TINY_AR_DIR),
                             out=str(tmp_path), tasks=tuple(N), sweeps={}, n=n, batch_size=8, use_vllm=use_vllm)


@pytest.mark.parametrize("task", list(N))
def test_vllm_cell_gets_the_same_tokens_as_the_ar_sampler(tmp_path, task):
    cell = ev.Cell(ev.AR_NAME, str(TINY_AR_DIR), ar_point(48), task)
    cfg_file, cell_file, out_file = tmp_path / "cfg.pkl", tmp_path / "cell.pkl", tmp_path / "vllm.json"
    cfg_file.write_bytes(pickle.dumps(_config(tmp_path / "vllm", "on", N[task])))
    cell_file.write_bytes(pickle.dumps(cell))
    env = {**os.environ, **CPU_ENV, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(_vllm_python()), str(ROOT / "tests" / "pipelines" / "vllm_cell.py"), str(cfg_file),
                           str(cell_file), str(out_file)], capture_output=True, text=True, timeout=CELL_TIMEOUT_S,
                          env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    via_vllm = json.loads(out_file.read_text())
    via_ar = eval_cell.run_cell(_config(tmp_path / "ar", "off", N[task]), cell)
    assert via_vllm["backend"] == "vllm" and via_ar["backend"] == "d3core-ar"
    assert via_vllm["protocol"] == via_ar["protocol"]
    assert [s["tokens"] for s in via_vllm["samples"]] == [s["tokens"] for s in via_ar["samples"]]
    assert [s["nfe"] for s in via_vllm["samples"]] == [s["nfe"] for s in via_ar["samples"]]
    assert via_vllm["accuracy"] == via_ar["accuracy"] and via_vllm["tpf"] == pytest.approx(via_ar["tpf"])
    assert all(s["tokens"] for s in via_ar["samples"])  # something was generated to compare
