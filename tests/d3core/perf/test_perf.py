"""GPU accounting on the CPU: fake-CUDA dry runs at real width, op costs, host time, the FSDP2 step dry run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from d3core.perf.costs import OpCosts
from d3core.perf.devices import DEVICES, H100, DeviceSpec
from d3core.perf.dryrun import dry_decode
from d3core.perf.fakecuda import _getitem, _setitem, fake_cuda
from d3core.perf.hosttime import ZeroCostDecoder, host_ms_per_step, zero_cost_model
from d3core.samplers.d3llm import D3LLMParams, D3LLMProgram
from d3core.samplers.fast_dllm import FastDLLMParams, FastDLLMProgram

ROOT = Path(__file__).resolve().parents[3]
SCHEDULE = D3LLMParams(gen_length=256, block_length=32, threshold=0.5, cache_delay_iter=1, early_stop=False)


def _prompts(batch, length=256):
    return np.random.default_rng(batch).integers(0, 100_000, (batch, length)).tolist()


def test_a_dry_decode_at_8b_width_runs_on_cuda_alone_and_accounts_its_memory():
    """Two of LLaDA-8B's layers at full width and vocabulary, the whole scripted schedule."""
    result = dry_decode("d3llm", "llada", "llada-8b", D3LLMProgram(), SCHEDULE, _prompts(2), tpf=9, layers=2)
    row = result.summary()
    assert result.devices_seen == {"cuda:0"}
    assert row["committed"] == 2 * 256 and row["steps"] == 29  # 9 a step: the schedule of gpu_decode.py
    weights = 2 * (4 * 4096**2 + 3 * 4096 * 12288 + 2 * 4096) * 2 + 2 * 126464 * 4096 * 2 + 4096 * 2
    assert result.weight_bytes == weights
    assert result.cache_bytes == 2 * 2 * 3 * 512 * 4096 * 2  # K and V, 2 layers, 2 rows + scratch, 512 slots, bf16
    assert weights + result.cache_bytes < result.peak_bytes < weights + result.cache_bytes + 4e9
    assert 250 < row["real_tokens_per_step"] / 2 < 260  # the d3llm window [cached, end): 255 at batch 1 in the issue
    # FLOPs: at least 2 per layer weight per recomputed token (the head runs on the logit cells only)
    layer_params = 2 * (4 * 4096**2 + 3 * 4096 * 12288)
    assert row["gflops_per_step"] * 1e9 > 2 * row["real_tokens_per_step"] * layer_params
    assert row["h100"]["op_roofline_ms"] >= row["h100"]["step_roofline_ms"] * 0.5 > 0


def test_the_dry_run_follows_the_host_schedule_step_for_step():
    host = ZeroCostDecoder(zero_cost_model("llada", "llada-8b"), D3LLMProgram(), 3, 512, tpf=5)
    for p in _prompts(3):
        host.add(p, SCHEDULE)
    steps = 0
    while host.rows:
        steps += host.step().forwarded
    dry = dry_decode("d3llm", "llada", "llada-8b", D3LLMProgram(), SCHEDULE, _prompts(3), tpf=5, layers=1)
    assert len(dry.steps) == steps


def test_a_dream_dry_run_reads_the_cached_hidden_states_and_mixed_rows_share_steps():
    params = [FastDLLMParams(gen_length=64, block_length=32, threshold=t, cache="dual", early_stop=False)
              for t in (0.9, 0.7, 0.9)]
    prompts = [_prompts(1, n)[0] for n in (40, 100, 70)]
    result = dry_decode("mixed", "dream", "dream-7b", FastDLLMProgram(), params, prompts, tpf=4, joins=[0, 2, 3],
                        rows=4, capacity=256, layers=1)
    assert result.cache_bytes > 0 and result.devices_seen == {"cuda:0"}
    assert max(s.rows for s in result.steps) == 3 and sum(s.committed for s in result.steps) == 3 * 64


def test_a_tensor_left_on_the_cpu_is_caught_as_on_a_gpu(monkeypatch):
    import d3core.models.layers as layers

    real = layers.inverse_frequencies
    monkeypatch.setattr(layers, "inverse_frequencies", lambda d, t, device: real(d, t, torch.device("cpu")))
    with pytest.raises(RuntimeError, match="same device"):
        dry_decode("d3llm", "llada", "llada-8b", D3LLMProgram(), SCHEDULE, _prompts(1), tpf=9, layers=1)


def test_a_matmul_of_two_dtypes_is_caught():
    with fake_cuda():
        a = torch.empty(8, 8, device="cuda")
        b = torch.empty(8, 8, device="cuda", dtype=torch.bfloat16)
        torch.mm(a, b)  # the fake mode alone lets this pass
        with OpCosts(DEVICES), pytest.raises(TypeError, match="mixes dtypes"):
            torch.mm(a, b)


INDEXES = [np.s_[1:3], np.s_[:, 0, None, None], np.s_[..., None], np.s_[2], np.s_[:, -2:], np.s_[::2, 1],
           np.s_[None, 1:], np.s_[-1, ..., 0]]


@pytest.mark.parametrize("index", INDEXES, ids=[str(i) for i in range(len(INDEXES))])
def test_the_fake_cuda_indexing_route_agrees_with_torch_indexing(index, monkeypatch):
    t = torch.arange(60.0).view(5, 4, 3)
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda")), raising=False)
    routed = _getitem(t, index)
    monkeypatch.undo()
    assert torch.equal(routed, t[index])


def test_the_fake_cuda_setitem_route_agrees_with_torch(monkeypatch):
    ref, routed = torch.zeros(6, 4), torch.zeros(6, 4)
    idx = torch.tensor([4, 1])
    for target, setter in ((ref, torch.Tensor.__setitem__), (routed, _setitem)):
        if setter is _setitem:
            monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda")), raising=False)
        setter(target, np.s_[1:3, 2], 7.0)
        setter(target, idx, torch.ones(2, 4))
        setter(target, np.s_[:, :1], torch.full((6, 1), 3.0))
        monkeypatch.undo()
    assert torch.equal(routed, ref)


def test_op_costs_count_a_matmul_and_split_its_bytes():
    w = torch.empty(64, 32)
    x = torch.empty(16, 32)
    spec = DeviceSpec("test", 1e12, 1e9, 1e9, "a test figure")
    costs = OpCosts({"test": spec}, weights=[w])
    with costs:
        x @ w.t()
    assert costs.record.flops == 2 * 16 * 32 * 64
    assert costs.record.bytes["weights"] == 64 * 32 * 4
    assert costs.record.bytes["activations"] == (16 * 32 + 16 * 64) * 4
    moved = (64 * 32 + 16 * 32 + 16 * 64) * 4
    assert costs.record.op_roofline_s["test"] == pytest.approx(max(2 * 16 * 32 * 64 / 1e12, moved / 1e9))


def test_a_cache_write_counts_the_rows_written_not_the_cache():
    cache = torch.zeros(1000, 8)
    costs = OpCosts({"h100": H100}, cache=[cache])
    with costs:
        cache.index_copy_(0, torch.tensor([3, 4]), torch.ones(2, 8))
    assert costs.record.bytes["kv"] == 2 * 8 * 4


def test_host_time_per_step_is_measured_without_the_device_part():
    model = zero_cost_model("llada", "llada-8b")
    row = host_ms_per_step(model, D3LLMProgram(), SCHEDULE, 4, 256, 9, repeats=1)
    assert row["steps"] == 29 and 0 < row["host_ms_per_step"] < 50


@pytest.mark.slow
def test_one_fsdp2_distillation_step_per_shard_at_8_workers():
    """A fresh process (the dry run starts its own fake process group); one layer at full width."""
    code = ("import json; from pipelines.distill_dryrun import dry_distill_step; "
            "print(json.dumps(dry_distill_step('llada', 'llada-8b', rows_per_worker=1, num_layers=1)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    peak = row["peak_bytes"]
    params = 4 * 4096**2 + 3 * 4096 * 12288 + 2 * 4096 + 2 * 126464 * 4096 + 4096
    assert peak["_FSDPRefType.SHARDED_PARAM"] == pytest.approx(params * 4 / 8, rel=0.01)  # fp32 master, 1/8
    assert peak["_FSDPRefType.OPT"] == pytest.approx(2 * params * 4 / 8, rel=0.01)  # AdamW's two states
    assert row["sequences_per_worker"] == 2 and row["tflops_per_worker"] > 0
