"""benchmarks/load_checkpoint.py: the random official-shape checkpoint it writes loads back; on a GPU, the
LLaDA-8B-shape bf16 sharded checkpoint loads from disk onto the GPU within bounded host memory and decodes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from d3core.models.checkpoint import load_pretrained

from benchmark_module import load_benchmark

bench = load_benchmark("load_checkpoint")


def test_the_random_checkpoint_is_a_sharded_bf16_official_layout(tmp_path, monkeypatch):
    monkeypatch.setattr("d3core.models.safetensors_io.DEFAULT_MAX_SHARD_BYTES", 4_000)
    info = bench.write_random_checkpoint("dream", "tiny", str(tmp_path))
    assert len(info["files"]) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = load_pretrained(str(tmp_path))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert sum(p.numel() * 2 for p in model.parameters()) == info["bytes"]
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
    assert 0.015 < float(model.embed.weight.float().std()) < 0.025


def test_without_cuda_the_benchmark_skips_cleanly(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.run("llada", "llada-8b", str(tmp_path)) == {"skipped": "no CUDA GPU: this benchmark loads onto a GPU"}
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.gpu
@pytest.mark.slow
def test_llada_8b_shape_loads_from_disk_onto_the_gpu_and_decodes(tmp_path):
    if shutil.disk_usage(tmp_path).free < 20 * 10**9:
        pytest.skip("needs ~17 GB of free disk for the bf16 LLaDA-8B-shape checkpoint")
    report = bench.run("llada", "llada-8b", str(tmp_path / "llada-8b"), decode_steps=4)
    print(json.dumps(report, indent=2))
    assert len(report["written"]["files"]) == 4 and report["written"]["bytes"] == 16031162368
    assert report["dtypes"] == ["torch.bfloat16"] and report["model_bytes"] == 16031162368
    largest = 126464 * 4096 * 2  # the embedding / output head in bf16
    # onto the GPU, the host holds one tensor at a time, never the model
    assert report["host_peak_growth_bytes"] <= 1.2 * (largest + 2**30), report
    assert report["model_bytes"] <= report["gpu_peak_bytes"] <= 1.05 * report["model_bytes"], report
    assert report["decoded_tokens"] == 32 and report["decode_nfe"] == 4
