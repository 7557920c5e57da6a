"""`--model d3ray` through lm-evaluation-harness's own CLI, offline, on the tiny teacher and a local task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional extra 'eval'")

from d3core.eval.harness import evaluate_task  # noqa: E402
from d3core.eval.lm_eval_model import D3RayLM, write_synthetic_task  # noqa: E402
from d3core.eval.tasks import get_task  # noqa: E402
from d3core.models.shipped import TINY_TEACHER_DIR  # noqa: E402
from d3core.samplers import get_sampler  # noqa: E402

N = 12
SAMPLER_ARGS = dict(threshold=0.5, gen_length=48, block_length=16, cache_delay_iter=2)
RUN_TIMEOUT_S = 600


def _offline_env(tmp: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp / "datasets"),
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("HF_ALLOW_CODE_EVAL", None)
    return env


@pytest.mark.slow
def test_lm_eval_cli_runs_d3ray_offline_and_matches_the_harness(tmp_path, teacher, tok):
    tasks = tmp_path / "tasks"
    name = write_synthetic_task(tasks, n=N)
    model_args = ",".join([f"pretrained={TINY_TEACHER_DIR}", "sampler=d3llm"]
                          + [f"{k}={v}" for k, v in SAMPLER_ARGS.items()])
    cmd = [sys.executable, "-m", "d3core.eval.lm_eval_model", "--model", "d3ray", "--model_args", model_args,
           "--tasks", name, "--include_path", str(tasks), "--apply_chat_template", "--batch_size", "6",
           "--device", "cpu", "--output_path", str(tmp_path / "out"), "--log_samples"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=_offline_env(tmp_path),
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "|d3ray_synthetic|" in done.stdout and "exact_match" in done.stdout  # lm-eval's own table
    assert "TPF" in done.stderr and "mean NFE" in done.stderr  # d3ray's decode line
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())
    accuracy = results["results"][name]["exact_match,last-number"]
    decode = results["config"]["d3ray"]["decode"][name]
    assert decode["requests"] == N and decode["nfe"] > 0 and decode["tpf"] > 1.0  # d3llm commits >1 token/forward
    assert results["config"]["d3ray"]["params"]["threshold"] == 0.5
    assert list((tmp_path / "out").rglob(f"samples_{name}_*.jsonl"))

    # the same problems, prompts and sampler through d3ray's own harness give the same score and TPF
    spec = get_sampler("d3llm")
    task = get_task("synthetic")
    ours = evaluate_task(teacher, tok, task, spec, spec.params_cls(**SAMPLER_ARGS), task.examples(N), batch_size=6,
                         generator=torch.Generator().manual_seed(0))
    assert accuracy == pytest.approx(ours.accuracy)
    assert decode["generated_tokens"] == ours.generated_tokens and decode["nfe"] == ours.total_nfe


def test_model_args_are_validated():
    with pytest.raises(ValueError, match="not fields of D3LLMParams"):
        D3RayLM(pretrained=str(TINY_TEACHER_DIR), sampler="d3llm", thresh=0.5)
    with pytest.raises(ValueError, match="unknown sampler"):
        D3RayLM(pretrained=str(TINY_TEACHER_DIR), sampler="greedy")
    with pytest.raises(ValueError, match="verifier"):
        D3RayLM(pretrained=str(TINY_TEACHER_DIR), sampler="apd")
    lm = D3RayLM(pretrained=str(TINY_TEACHER_DIR), sampler="vanilla", gen_length=16, block_length=16,
                 batch_size="auto", device="cuda:0" if not torch.cuda.is_available() else None)
    assert lm.device.type in ("cpu", "cuda") and lm.batch >= 1
    with pytest.raises(NotImplementedError, match="generate_until"):
        lm.loglikelihood([])


def test_generate_until_cuts_at_until_and_tallies_per_task(tok):
    lm = D3RayLM(pretrained=str(TINY_TEACHER_DIR), sampler="vanilla", gen_length=32, block_length=16, device="cpu")

    class Request:
        def __init__(self, context, gen_kwargs):
            self.args, self.task_name = (context, gen_kwargs), "t"

    question = get_task("synthetic").examples(1)[0].question
    context = lm.apply_chat_template([{"role": "user", "content": question}])
    assert context == tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                              add_generation_prompt=True)
    full, cut = lm.generate_until([Request(context, {"until": []}), Request(context, {"until": ["="]})])
    assert "=" in full and cut == full[: full.index("=")]
    tally = lm.get_model_info()["d3ray"]["decode"]["t"]
    assert tally["requests"] == 2 and tally["nfe"] == 64  # vanilla: one forward per slot, 32 slots each
