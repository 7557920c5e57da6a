"""The shipped tiny checkpoints: official layout, loadable offline, and accurate on held-out problems."""

from __future__ import annotations

import json

import pytest

from d3core.eval import synthetic
from d3core.eval.harness import evaluate_synthetic
from d3core.models.checkpoint import load_pretrained
from d3core.models.shipped import TINY_AR_DIR, TINY_TEACHER_DIR, load_tiny_ar, load_tiny_tokenizer
from d3core.samplers.ar import ARParams
from d3core.samplers.vanilla import VanillaParams


def test_shipped_files_are_small_official_layout_checkpoints():
    cfg = json.loads((TINY_TEACHER_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["LLaDAModelLM"]
    ar_cfg = json.loads((TINY_AR_DIR / "config.json").read_text())
    assert ar_cfg["architectures"] == ["LlamaForCausalLM"]
    total = sum(p.stat().st_size for d in (TINY_TEACHER_DIR, TINY_AR_DIR) for p in d.glob("*.safetensors"))
    assert total <= 20 * 2**20
    tok = load_tiny_tokenizer()
    assert tok.mask_token_id == cfg["mask_token_id"] and tok.chat_template


@pytest.mark.slow
def test_teacher_reaches_96_5_percent_with_one_token_per_step():
    """Measured 97.4% on these 500 problems (docs/benchmarks.md); the floor sits just below it, so
    a regression in the weights, the loader or the sampler fails here."""
    teacher = load_pretrained(str(TINY_TEACHER_DIR))  # the official-layout loader, nothing special
    report = evaluate_synthetic(teacher, load_tiny_tokenizer(), "vanilla",
                                VanillaParams(gen_length=48, block_length=16),
                                synthetic.generate("test", 500, seed=0), batch_size=125)
    assert report.mean_nfe == 48
    assert report.accuracy >= 0.965, report.summary()


@pytest.mark.slow
def test_ar_baseline_reaches_90_percent_greedy():
    report = evaluate_synthetic(load_tiny_ar(), load_tiny_tokenizer(), "ar", ARParams(gen_length=48),
                                synthetic.generate("test", 500, seed=0), batch_size=125)
    assert report.accuracy >= 0.90, report.summary()
