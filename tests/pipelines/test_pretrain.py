"""pipelines/pretrain.py on a few steps: export in the official layout, resume, AR initialisation."""

from __future__ import annotations

import json

import pytest
import torch

from d3core.models.checkpoint import load_pretrained
from pipelines import pretrain as P

FAST = dict(batch_size=4, eval_every=1000, eval_n=2, final_eval_n=2, warmup_steps=1, ckpt_every=2)


def test_dllm_trains_exports_and_resumes(tmp_path):
    out = str(tmp_path / "teacher")
    first = P.train(P.PretrainConfig(kind="dllm", out=out, steps=2, **FAST))
    assert first["final_eval"]["n"] == 2
    state = torch.load(tmp_path / "teacher" / "_state" / "state.pt", weights_only=False)
    assert state["step"] == 2 and state["stream_count"] == 8
    again = P.train(P.PretrainConfig(kind="dllm", out=out, steps=4, **FAST))  # resumes at step 2
    assert again["examples_seen"] == 16  # 4 steps x 4 examples: the data stream continued, not restarted
    model = load_pretrained(out)
    cfg = json.loads((tmp_path / "teacher" / "config.json").read_text())
    assert cfg["architectures"] == ["LLaDAModelLM"] and model.config.num_layers == 4
    assert (tmp_path / "teacher" / "tokenizer.json").exists()


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    P.train(P.PretrainConfig(kind="dllm", out=str(tmp_path / "a"), steps=4, **FAST))
    P.train(P.PretrainConfig(kind="dllm", out=str(tmp_path / "b"), steps=2, **FAST))
    P.train(P.PretrainConfig(kind="dllm", out=str(tmp_path / "b"), steps=4, **FAST))
    a, b = load_pretrained(str(tmp_path / "a")), load_pretrained(str(tmp_path / "b"))
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


def test_ar_then_dllm_initialised_from_it(tmp_path):
    P.train(P.PretrainConfig(kind="ar", out=str(tmp_path / "ar"), steps=2, **FAST))
    cfg = P.PretrainConfig(kind="dllm", out=str(tmp_path / "t"), steps=2, init_from=str(tmp_path / "ar"), **FAST)
    model = P.build(cfg)
    from transformers import AutoModelForCausalLM

    ar = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ar"))
    assert torch.equal(model.layers[0].attn.q.weight, ar.model.layers[0].self_attn.q_proj.weight)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="kind='gpt'"):
        P.PretrainConfig(kind="gpt")
    with pytest.raises(ValueError, match="init_from='x' applies to kind='dllm' only"):
        P.PretrainConfig(kind="ar", init_from="x")
    with pytest.raises(ValueError, match="warmup_steps=10"):
        P.PretrainConfig(steps=10, warmup_steps=10)
