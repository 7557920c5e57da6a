"""pipelines/evaluate.py: config validation, cell planning, the Ray sweep, resumability, vLLM fallback."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import pytest

from d3core.models.shipped import TINY_AR_DIR, TINY_TEACHER_DIR
from pipelines import eval_cell
from pipelines import evaluate as ev
from pipelines.cli import parse_evaluate
from pipelines.recipes import get_recipe
from pipelines.sweeps import ar_point

TEACHER, AR = str(TINY_TEACHER_DIR), str(TINY_AR_DIR)


def small(out, **kw) -> ev.EvaluateConfig:
    base = dict(models={"teacher": TEACHER, "twin": TEACHER}, ar_model=AR, out=str(out),
                sweeps={"vanilla": (), "fast_dllm.confidence_threshold": (0.9,),
                        "d3llm.entropy_threshold": (0.5, 1.0)}, n=8, batch_size=8)
    base.update(kw)
    return ev.EvaluateConfig(**base)


def _vllm_imports() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    try:
        import vllm  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    return True


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="models is empty"):
        small(tmp_path, models={})
    with pytest.raises(ValueError, match="reserved"):
        small(tmp_path, models={"AR": TEACHER})
    with pytest.raises(ValueError, match="tasks"):
        small(tmp_path, tasks=("gsm9k",))
    with pytest.raises(ValueError, match="sweepable"):
        small(tmp_path, sweeps={"ar": (0.5,)})
    with pytest.raises(ValueError, match="empty"):
        small(tmp_path, sweeps={"d3llm.entropy_threshold": ()})
    # one name per concept: a threshold says which one it is
    with pytest.raises(ValueError, match="fast_dllm sweeps its confidence_threshold.*write fast_dllm.confidence_thr"):
        small(tmp_path, sweeps={"fast_dllm.entropy_threshold": (0.5,)})
    with pytest.raises(ValueError, match="d3llm sweeps its entropy_threshold \\(in nats, lower is stricter\\)"):
        small(tmp_path, sweeps={"d3llm": (0.5,)})
    with pytest.raises(ValueError, match="sets \\['threshold'\\].*threshold from sweeps"):
        small(tmp_path, sampler_params={"d3llm": {"threshold": 0.2}})
    with pytest.raises(ValueError, match="divide"):
        small(tmp_path, gen_length=40, block_length=16)
    with pytest.raises(ValueError, match="use_vllm"):
        small(tmp_path, use_vllm="maybe")
    with pytest.raises(ValueError, match="preset"):
        get_recipe("huge")
    assert get_recipe("llada-8b").evaluate.models == {"teacher": "GSAI-ML/LLaDA-8B-Instruct"}


def test_tiny_preset_and_cli(tmp_path):
    cfg = dataclasses.replace(get_recipe("tiny").evaluate, out=str(tmp_path))
    assert cfg.models == {"teacher": TEACHER} and cfg.ar_model == AR and cfg.n == 100
    assert all(len(cfg.sweep_values()[s]) >= 4 for s in ("fast_dllm", "dparallel", "d3llm")) and "vanilla" in cfg.sweeps
    cli, overwrite = parse_evaluate(["--preset", "tiny", "--model", "teacher=A", "--model", "student=B", "--out", "X",
                                    "--sweep", "d3llm.entropy_threshold=0.3,0.5", "--sweep", "vanilla", "--n", "5",
                                    "--ar-model", "None", "--param", "d3llm.cache_delay_iter=1"])
    assert cli.models == {"teacher": "A", "student": "B"} and cli.ar_model is None and cli.n == 5 and not overwrite
    assert cli.sweeps == {"d3llm.entropy_threshold": (0.3, 0.5), "vanilla": ()}
    assert cli.sampler_params == {"d3llm": {"cache_delay_iter": 1}, "fast_dllm": {"cache": "dual"}}  # merged
    assert cfg.sampler_params["d3llm"] == {"cache_delay_iter": 2}  # the recipe untouched
    assert parse_evaluate(["--sweep", "d3llm=0.3"])[0].sweeps == {"d3llm.entropy_threshold": (0.3,)}  # its one axis
    import pickle

    assert pickle.loads(pickle.dumps(cfg)) == cfg  # crosses Ray boundaries as itself


def test_plan_and_keys(tmp_path):
    cfg = small(tmp_path)
    cells = ev.plan_cells(cfg)
    assert len(cells) == 1 + 2 * (1 + 1 + 2)
    keys = [c.key(cfg) for c in cells]
    assert len(set(keys)) == len(keys)
    assert keys != [c.key(small(tmp_path, n=9)) for c in cells]  # any change gives new cells
    d3 = next(c for c in cells if c.sampler == "d3llm")
    from d3core.samplers.d3llm import D3LLMParams

    cached = next(c for c in ev.plan_cells(small(tmp_path, sampler_params={"d3llm": {"cache_delay_iter": 1}}))
                  if c.sampler == "d3llm" and c.threshold == d3.threshold)
    assert cached.point.params == D3LLMParams(gen_length=48, block_length=16, threshold=d3.threshold,
                                              cache_delay_iter=1)


@pytest.mark.skipif(_vllm_imports(), reason="vLLM is installed here: the fallback path is not taken")
def test_vllm_on_without_vllm_fails_clearly_and_auto_falls_back(tmp_path):
    cell = ev.Cell("AR", AR, ar_point(48), "synthetic")
    with pytest.raises(RuntimeError, match="use_vllm='on'"):
        eval_cell._ar_backend(small(tmp_path, use_vllm="on"), cell, "cpu")
    _, spec, backend = eval_cell._ar_backend(small(tmp_path, use_vllm="auto"), cell, "cpu")
    assert backend == "d3core-ar" and spec.name == "ar"


@pytest.mark.skipif(not _vllm_imports(), reason="vLLM is not importable here (optional extra 'vllm')")
def test_ar_cell_through_vllm_matches_the_ar_sampler(tmp_path):
    cell = ev.Cell("AR", AR, ar_point(48), "synthetic")
    via_vllm = eval_cell.run_cell(small(tmp_path, use_vllm="on"), cell)
    via_ar = eval_cell.run_cell(small(tmp_path, use_vllm="off"), cell)
    assert via_vllm["backend"] == "vllm" and via_ar["backend"] == "d3core-ar"
    assert via_vllm["accuracy"] == via_ar["accuracy"]


@pytest.mark.slow
def test_sweep_writes_report_and_resumes(ray_local, tmp_path, monkeypatch):
    cfg = small(tmp_path / "run")
    report = ev.run_evaluation(cfg)
    out = tmp_path / "run"
    for name in ("report.json", "report.md", "aup.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "aup.png").read_bytes()[:4] == b"\x89PNG"
    keys = list(report["samples"])  # cell keys, in the report's cell order
    assert len(keys) == len(ev.plan_cells(cfg)) == len(report["cells"])
    assert sorted(os.listdir(out / "cells")) == sorted([f"{k}.json" for k in keys]
                                                       + [f"{k}.samples.jsonl" for k in keys])
    rows = [json.loads(line) for line in (out / "cells" / f"{keys[0]}.samples.jsonl").read_text().splitlines()]
    assert len(rows) == cfg.n and {"id", "prompt", "output", "answer", "correct", "nfe", "unmask_steps"} <= set(rows[0])
    assert sum(r["correct"] for r in rows) == round(report["cells"][0]["accuracy"] * cfg.n)
    assert all(len(r["unmask_steps"]) == len(r["tokens"]) for r in rows)
    meta = report["meta"]["provenance"]
    assert meta["d3ray"] and meta["libraries"]["torch"] and meta["seeds"]["seed"] == cfg.seed and "sha" in meta["git"]
    for c in report["cells"]:  # a 95% bootstrap interval around every accuracy
        lo, hi = c["accuracy_ci"]
        assert 0.0 <= lo <= c["accuracy"] <= hi <= 1.0
    assert set(report["aup_ci"]["synthetic"]) == set(report["aup"]["synthetic"])
    assert ["teacher/d3llm", "twin/d3llm"] in report["within_noise"]["synthetic"]  # identical systems: within noise
    aup = report["aup"]["synthetic"]
    assert set(aup) == {"AR/ar", "teacher/vanilla", "teacher/fast_dllm", "teacher/d3llm", "twin/vanilla",
                        "twin/fast_dllm", "twin/d3llm"}
    assert aup["twin/d3llm"] == pytest.approx(aup["teacher/d3llm"])  # same weights, greedy: same points
    assert aup["AR/ar"] == pytest.approx(report["y_max"]["synthetic"])  # the tiny AR model is the best system
    ar_cell = next(c for c in report["cells"] if c["sampler"] == "ar")
    assert ar_cell["backend"] == ("vllm" if _vllm_imports() else "d3core-ar")
    d3 = [c for c in report["cells"] if c["model"] == "teacher" and c["sampler"] == "d3llm"]
    assert max(c["tpf"] for c in d3) > 1.5 and all(0 <= c["accuracy"] <= 1 for c in d3)
    md = (out / "report.md").read_text()
    assert "| teacher/d3llm |" in md and "| AR/ar |" in md
    assert "paired-bootstrap" in md and "within noise of" in md and "Provenance: d3ray" in md
    assert json.loads((out / "report.json").read_text())["aup"] == report["aup"]

    def no_decoding(*args, **kwargs):
        raise AssertionError("a rerun must not decode finished cells")

    monkeypatch.setattr(ev, "run_cells", no_decoding)
    again = ev.run_evaluation(cfg)
    assert again["aup"] == report["aup"]


def test_bad_sampler_settings_fail_before_any_cell_runs(tmp_path):
    with pytest.raises(ValueError,
                       match=r"fast_dllm.confidence_threshold=1.5: threshold=1.5: must lie in \[0.0, 1.0\]"):
        small(tmp_path, sweeps={"fast_dllm.confidence_threshold": (1.5,)})  # a confidence above 1
    with pytest.raises(ValueError, match="D3LLMParams"):
        small(tmp_path, sampler_params={"d3llm": {"no_such_field": 1}})
