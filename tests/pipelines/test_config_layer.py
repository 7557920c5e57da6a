"""The config layer (issue 32): imports run one way (recipes import the stages, never the reverse), sweeps are
typed once and their params built once, run directories of earlier versions resume, and the main job's console
shows its bars while the logs go to RUN_DIR/logs/."""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from d3core.samplers.d3llm import D3LLMParams
from d3core.samplers.fast_dllm import FastDLLMParams
from d3core.samplers.vanilla import VanillaParams
from pipelines import _cli, cli, full
from pipelines import evaluate as E
from pipelines import fingerprint as F
from pipelines.logs import DRIVER_LOG, WORKERS_LOG, RunLogs
from pipelines.recipes import get_recipe
from pipelines.sweeps import SweepPoint, parse_sampler_params, parse_sweeps, sweep_points, sweeps_from_data

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
       "RAY_ADDRESS": ""}
STAGES = ("pipelines.trajectories", "pipelines.distill", "pipelines.evaluate")


# -- imports run one way ----------------------------------------------------------------------------
def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (functions and ``__main__`` blocks included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_only_the_cli_and_the_main_job_import_the_recipes_and_serve_apps_imports_no_pipelines():
    readers = {p.name for p in (ROOT / "pipelines").glob("*.py") if "pipelines.recipes" in _imports(p)}
    assert readers == {"cli.py", "full.py"}
    above = {p.name for p in (ROOT / "pipelines").glob("*.py") if "pipelines.cli" in _imports(p)}
    assert above == {"full.py"}  # the stages' __main__ blocks run it (runpy), import nothing from it
    for path in (ROOT / "serve_apps").glob("*.py"):
        assert not [m for m in _imports(path) if m.split(".")[0] == "pipelines"], path.name


def test_stage_modules_and_the_serve_app_load_without_the_recipes():
    code = ("import sys; import " + ", ".join((*STAGES, "serve_apps.config", "serve_apps.openai_app")) + "; "
            "print(sorted(m for m in sys.modules if m in ('pipelines.recipes', 'pipelines.cli', 'pipelines._cli')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["pipelines/trajectories.py", "--help"], ["pipelines/distill.py", "--help"],
                                  ["pipelines/evaluate.py", "--help"], ["-m", "pipelines.cli", "evaluate", "--help"]])
def test_every_stage_script_still_answers_its_documented_command_line(argv):
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, env={**ENV, "COLUMNS": "200"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--preset" in done.stdout and "--config" in done.stdout and "--overwrite" in done.stdout
    stage = argv[-2] if argv[0] == "-m" else Path(argv[0]).stem
    assert {"trajectories": "--num-gpus-per-actor", "distill": "--warmup-steps", "evaluate": "--sweep"}[stage] \
        in done.stdout


# -- sweeps: typed once, built once -------------------------------------------------------------------
def test_the_words_typed_become_typed_sweeps_once():
    assert parse_sweeps(["d3llm.entropy_threshold=0.3,0.5", "vanilla", "fast_dllm=0.9"]) == {
        "d3llm.entropy_threshold": (0.3, 0.5), "vanilla": (), "fast_dllm.confidence_threshold": (0.9,)}
    assert sweeps_from_data({"d3llm.entropy_threshold": [0.3, 0.5], "vanilla": []}) == {
        "d3llm.entropy_threshold": (0.3, 0.5), "vanilla": ()}  # a recipe.yaml's mapping: no detour through words
    assert parse_sampler_params(["d3llm.cache_delay_iter=1", "fast_dllm.cache=prefix"],
                                {"d3llm": {"cache_delay_iter": 2, "early_stop": True}}) == {
        "d3llm": {"cache_delay_iter": 1, "early_stop": True}, "fast_dllm": {"cache": "prefix"}}
    with pytest.raises(ValueError, match="d3llm sweeps its entropy_threshold"):
        parse_sweeps(["d3llm.confidence_threshold=0.5"])


def test_a_sweep_point_holds_its_samplers_complete_params():
    points = sweep_points({"vanilla": (), "d3llm.entropy_threshold": (0.3,), "fast_dllm.confidence_threshold": (0.9,)},
                          {"d3llm": {"cache_delay_iter": 1}}, gen_length=32, block_length=16)
    assert points == (SweepPoint("vanilla", None, VanillaParams(gen_length=32, block_length=16)),
                      SweepPoint("d3llm", 0.3, D3LLMParams(gen_length=32, block_length=16, threshold=0.3,
                                                           cache_delay_iter=1)),
                      SweepPoint("fast_dllm", 0.9, FastDLLMParams(gen_length=32, block_length=16, threshold=0.9)))


def test_a_threshold_goes_from_the_flag_to_the_cell_as_one_params_object(tmp_path):
    cfg = full.parse_args(["--sweeps", "d3llm=0.3", "--param", "d3llm.cache_delay_iter=1",
                           "--run-dir", str(tmp_path)]).bound().evaluate
    (point,) = cfg.points
    assert point.params == D3LLMParams(gen_length=48, block_length=16, threshold=0.3, cache_delay_iter=1)
    cells = [c for c in E.plan_cells(cfg) if c.sampler == "d3llm"]
    assert cells and all(c.point is point for c in cells)  # built once, on the driver, shared by the cells
    sent = pickle.loads(pickle.dumps(cells[0]))  # what the Ray task receives: the params object itself
    assert isinstance(sent.point.params, D3LLMParams) and sent.point.params.threshold == 0.3
    assert sent.record() == {"model": "teacher", "uri": cells[0].uri, "sampler": "d3llm", "threshold": 0.3,
                             "task": "synthetic", "identity": ""}


# -- run directories of earlier versions -------------------------------------------------------------
def test_a_run_directory_made_before_the_config_layer_change_resumes(tmp_path):
    """Cell keys and fingerprints as the version before it computed them (so finished cells are kept)."""
    cfg = E.EvaluateConfig(models={"teacher": "hub/teacher"}, ar_model="hub/ar", out=str(tmp_path / "e"), n=8,
                           sweeps={"vanilla": (), "d3llm.entropy_threshold": (0.3,)})
    keys = [c.key(cfg) for c in E.plan_cells(cfg, {"hub/teacher": "t1", "hub/ar": "a1"})]
    assert keys == ["synthetic__AR__ar__4af443bfcb", "synthetic__teacher__vanilla__84e948b4dc",
                    "synthetic__teacher__d3llm_t0.3__bca265d601"]
    assert F.digest(E.fingerprint(cfg, {"hub/teacher": {"id": "t"}, "hub/ar": {"id": "a"}})) == "033a48dabdf81946"
    # its recipe.yaml (the serve preset was written as "custom") still configures the run
    now = full.parse_args(["--run-dir", str(tmp_path / "run")])
    data = _cli.to_data(now.bound())
    data["serve"]["preset"] = "custom"
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(data))
    again = full.parse_args(["--config", str(path), "--run-dir", str(tmp_path / "run")]).bound()
    assert dataclasses.replace(again, serve=now.bound().serve) == now.bound()


def test_stage_configs_come_from_a_recipe_not_from_a_preset_keyword():
    llada = get_recipe("llada-8b")
    assert dataclasses.replace(llada.distill, warmup_steps=0).lr == llada.distill.lr
    assert cli.parse_distill(["--preset", "llada-8b", "--warmup-steps", "0"])[0] == \
        dataclasses.replace(llada.distill, warmup_steps=0)


# -- the console and the logs ------------------------------------------------------------------------
def test_logs_wait_outside_the_run_dir_until_it_is_claimed(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with RunLogs(str(run_dir)) as logs:
        logging.getLogger("ray.data").info("ray data says hello")
        logging.getLogger("d3ray.full").info("d3ray says hello")
        assert not run_dir.exists()  # a refusal here would leave the run dir as it was
        logs.claim()
        logging.getLogger("transformers").warning("transformers says hello")
    text = (run_dir / "logs" / DRIVER_LOG).read_text()
    assert all(f"{who} says hello" in text for who in ("ray data", "d3ray", "transformers"))
    out = capsys.readouterr()
    assert "hello" not in out.out + out.err


def test_a_refused_main_job_is_one_line_and_leaves_no_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "pipelines/full.py", "--teacher", str(tmp_path / "nope"), "--run-dir",
                           str(run_dir)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert line.startswith(f"error: teacher={str(tmp_path / 'nope')!r}: ") and "no config.json" in line
    assert not run_dir.exists()


@pytest.mark.slow
def test_a_stage_writes_rays_chatter_to_the_run_logs_not_the_console(tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "pipelines/full.py", "--run-dir", str(run_dir), "--skip",
                           "distill,evaluate", "--n-prompts", "8", "--trajectories.shard-size", "4"], cwd=ROOT,
                          env=ENV, capture_output=True, timeout=600)  # bytes: tqdm's \r stays a \r
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, (stdout + stderr)[-3000:]
    assert stdout.splitlines() == [
        f"d3ray main job (tiny): recipe {run_dir}/recipe.yaml, logs {run_dir}/logs", "distill: skipped (--skip)",
        "evaluate: skipped (--skip)", f"report: {run_dir}/report.md"]
    assert stderr.count("\n") == 1  # one line: the stage's bar (tqdm redraws it with \r), nothing else
    assert stderr.rstrip("\n").rsplit("\r", 1)[-1].startswith("trajectory shards: 100%")
    driver = (run_dir / "logs" / DRIVER_LOG).read_text()
    assert "Started a local Ray instance" in driver and "ray.data" in driver and "d3ray.trajectories" in driver
    assert (run_dir / "logs" / WORKERS_LOG).exists()  # where the decoder actors print (Ray's markers dropped)


# -- a config file's values ---------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ('distill:\n  lr: "fast"\n', r"distill\.lr='fast': expected a number"),
    ('trajectories:\n  seed: [1, 2]\n', r"trajectories\.seed=\[1, 2\]: expected an integer"),
    ('evaluate:\n  anchor_vanilla: "maybe"\n', r"evaluate\.anchor_vanilla='maybe': expected true or false"),
    ("serve:\n  model_name: 3\n", r"serve\.model_name=3: expected text"),
    ("evaluate:\n  sweeps: [1, 2\n", r"not valid YAML \(.*line 3"),
])
def test_a_config_file_value_of_the_wrong_kind_is_refused_naming_the_field(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        full.parse_args(["--config", str(path), "--run-dir", str(tmp_path / "run")])
    assert "\n" not in str(err.value)  # one line on the console


def test_numbers_a_config_file_types_as_text_are_read_as_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("distill:\n  lr: 1e-4\n")  # YAML 1.1 reads 1e-4 as a string
    assert cli.parse_distill(["--config", str(path)])[0].lr == 1e-4
