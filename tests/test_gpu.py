"""CUDA checks (skipped without a GPU): decoding on the GPU matches the CPU reference, and the
FSDP2 distillation step's GPU policy (bf16 params, fp32 reduction) tracks the fp32 step.

Nothing here imports Ray, so the file also runs on a bare GPU machine with torch alone:
``pytest -m gpu tests/test_gpu.py``.
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch

from d3core.eval import synthetic
from d3core.sft import encode_prompt

pytestmark = pytest.mark.gpu

N_PROBLEMS = 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prompts(tok):
    return [encode_prompt(tok, p.question) for p in synthetic.generate("test", N_PROBLEMS, 0)]


def _decode(sampler: str, model, prompts, **params):
    from d3core.samplers import get_sampler

    spec = get_sampler(sampler)
    with torch.no_grad():
        result = spec.generate(model, prompts, spec.params_cls(**params))
    return [list(s.response_ids) for s in result.sequences], sum(s.nfe for s in result.sequences)


def test_forward_on_gpu_matches_cpu(teacher, prompts):
    from d3core.samplers.base import make_batch

    gpu = copy.deepcopy(teacher).to("cuda")
    cfg = teacher.config
    batch = make_batch(prompts[:16], 48, cfg.mask_id, cfg.pad_id)
    with torch.no_grad():
        ref = teacher(batch.x, batch.positions, batch.attention_mask)
        out = gpu(batch.x.cuda(), batch.positions.cuda(), batch.attention_mask.cuda()).cpu()
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=2e-3, rtol=1e-3), float((out - ref).abs().max())


@pytest.mark.parametrize("sampler,params", [("vanilla", {}), ("d3llm", {"threshold": 0.5, "cache_delay_iter": 1})])
def test_decoding_on_gpu_matches_cpu(teacher, prompts, sampler, params):
    """Same tokens at temperature 0 (a near-tie may flip under another summation order: <= 1 row in 16)."""
    cpu_tokens, cpu_nfe = _decode(sampler, teacher, prompts, **params)
    gpu_tokens, gpu_nfe = _decode(sampler, copy.deepcopy(teacher).to("cuda"), prompts, **params)
    same = sum(a == b for a, b in zip(cpu_tokens, gpu_tokens))
    assert same >= len(prompts) * 15 // 16, f"{same}/{len(prompts)} rows identical"
    assert abs(gpu_nfe - cpu_nfe) <= 0.05 * cpu_nfe


def _trajectory_rows(teacher, prompts, n: int = 32) -> list[dict]:
    from d3core.samplers import get_sampler

    spec = get_sampler("vanilla")
    with torch.no_grad():
        result = spec.generate(teacher, prompts[:n], spec.params_cls())
    return [dict(id=f"r{i}", prompt_ids=list(p), response_ids=list(s.tokens), unmask_step=list(s.unmask_step))
            for i, (p, s) in enumerate(zip(prompts[:n], result.sequences))]


def _steps(model, rows, n_steps: int, sgd: bool = False) -> list[float]:
    from d3core.distill.losses import LossWeights
    from d3core.distill.objective import DistillObjective
    from pipelines.distill_worker import distill_step

    objective = DistillObjective(weights=LossWeights(entropy_weight=8.0))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1.0) if sgd else torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.95))
    lr = 1.0 if sgd else 5e-4
    return [distill_step(model, optimizer, objective, rows, step, 100, 1.5, 0, lr, 1e9)["loss"]
            for step in range(n_steps)]


def _flat(model) -> torch.Tensor:
    return torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().reshape(-1).cpu()
                      for p in model.parameters()])


def test_fsdp2_bf16_step_tracks_fp32(teacher, prompts):
    """FSDP2 with the GPU policy (bf16 compute, fp32 master weights and reduction) on a 1-GPU NCCL group:
    the first step's loss and gradient match the fp32 step's within bf16 precision, and training moves."""
    import torch.distributed as dist

    from pipelines.distill_worker import shard_model

    rows = _trajectory_rows(teacher, prompts)
    start = _flat(teacher)
    ref = copy.deepcopy(teacher).to("cuda").train()
    ref_loss = _steps(ref, rows, 1, sgd=True)[0]
    ref_update = _flat(ref) - start

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        model = shard_model(copy.deepcopy(teacher).to("cuda").train(), use_gpu=True)
        assert all(p.dtype == torch.float32 for p in model.parameters()), "master weights must stay fp32"
        loss = _steps(model, rows, 1, sgd=True)[0]
        update = _flat(model) - start
        trained = shard_model(copy.deepcopy(teacher).to("cuda").train(), use_gpu=True)
        losses = _steps(trained, rows, 6)
    finally:
        dist.destroy_process_group()
    assert abs(loss - ref_loss) <= 0.04 * ref_loss, (loss, ref_loss)
    cosine = float(torch.nn.functional.cosine_similarity(update, ref_update, dim=0))
    assert cosine > 0.95, cosine
    assert torch.isfinite(torch.tensor(losses)).all() and losses[-1] < losses[0], losses


# ---------------------------------------------------------------- decode engine on the GPU
GRAPH_CASES = [("d3llm", {"threshold": 0.5}), ("d3llm", {"threshold": 0.5, "cache_delay_iter": 2}),
               ("fast_dllm", {"threshold": 0.7, "cache": "dual"}), ("dparallel", {"threshold": 0.5, "cache": "prefix"}),
               ("vanilla", {"steps": 24}), ("d3llm", {"threshold": 0.5, "cache_delay_iter": 1, "temperature": 0.8})]


def _decode_rows(model, prompts, sampler, params, graphs: bool):
    """Graphs against eager decoding at the same buckets (same padded GEMM shapes, so no near-tie flips)."""
    from d3core.samplers import d3llm, dparallel, fast_dllm, get_sampler, vanilla
    from d3core.samplers.engine import Decoder

    programs = {"d3llm": d3llm.D3LLMProgram, "fast_dllm": fast_dllm.FastDLLMProgram,
                "dparallel": dparallel.DParallelProgram, "vanilla": vanilla.VanillaProgram}
    params = get_sampler(sampler).params_cls(**params)
    d = Decoder(model, programs[sampler](), rows=len(prompts), capacity=128, graphs=graphs, buckets=True)
    rows = [d.add(p, params, seed=11 + i) for i, p in enumerate(prompts)]
    while d.rows:
        d.step()
    return [(r.result.tokens, r.result.nfe) for r in rows], d


@pytest.mark.parametrize("sampler,params", GRAPH_CASES, ids=[f"{s}-{i}" for i, (s, _) in enumerate(GRAPH_CASES)])
@pytest.mark.parametrize("batch", [1, 8])
def test_cuda_graph_steps_give_the_eager_tokens(teacher, prompts, sampler, params, batch):
    gpu = copy.deepcopy(teacher).to("cuda")
    groups = [prompts[i: i + batch] for i in range(0, 4 if batch == 1 else 16, batch)]
    eager = [r for g in groups for r in _decode_rows(gpu, g, sampler, params, graphs=False)[0]]
    graphed, runners = [], []
    for g in groups:
        rows, d = _decode_rows(gpu, g, sampler, params, graphs=True)
        graphed += rows
        runners.append(d.graphs)
    assert sum(r.captures for r in runners) > 0 and sum(r.replays for r in runners) > 0
    assert graphed == eager


def test_generate_reuses_graphs_across_calls_on_the_gpu(teacher, prompts):
    from d3core.samplers import get_sampler

    gpu = copy.deepcopy(teacher).to("cuda")
    spec = get_sampler("d3llm")
    params = spec.params_cls(threshold=0.5, cache_delay_iter=1)
    stats = [spec.generate(gpu, prompts[i: i + 8], params).stats for i in (0, 8, 16)]
    assert stats[0]["graph_captures"] > 0
    assert all(s["graph_captures"] < stats[0]["graph_captures"] and s["graph_replays"] > 0 for s in stats[1:]), stats


@pytest.mark.parametrize("graphs", [False, True])
def test_steady_state_steps_make_no_device_to_host_sync(teacher, prompts, graphs):
    """torch.cuda.set_sync_debug_mode("error") raises on any synchronising call during the steps."""
    from d3core.samplers.d3llm import D3LLMParams, D3LLMProgram
    from d3core.samplers.engine import Decoder

    gpu = copy.deepcopy(teacher).to("cuda")
    params = D3LLMParams(threshold=0.5, cache_delay_iter=2)
    d = Decoder(gpu, D3LLMProgram(), rows=8, capacity=128, graphs=graphs)
    for p in prompts[:8]:  # a first decode captures every shape the second one needs
        d.add(p, params)
    while d.rows:
        d.step()
    rows = [d.add(p, params) for p in prompts[:8]]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        while d.rows:
            d.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(r.result is not None for r in rows)


def test_bf16_decoding_on_gpu_keeps_the_accuracy(teacher, tok):
    from d3core.eval.harness import evaluate_synthetic
    from d3core.samplers.d3llm import D3LLMParams

    problems = synthetic.generate("test", 128, 0)
    params = D3LLMParams(threshold=0.5, cache_delay_iter=2)
    fp32 = evaluate_synthetic(copy.deepcopy(teacher).to("cuda"), tok, "d3llm", params, problems, batch_size=64)
    bf16 = evaluate_synthetic(copy.deepcopy(teacher).to("cuda", torch.bfloat16), tok, "d3llm", params, problems,
                              batch_size=64)
    assert bf16.accuracy >= fp32.accuracy - 0.08, (bf16.accuracy, fp32.accuracy)
    assert bf16.tpf > 1.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dream_gqa_with_a_padding_mask_runs_on_fused_sdpa_kernels(dtype):
    import numpy as np
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from d3core.cache import KVCache
    from d3core.models.registry import build_model
    from d3core.samplers.packing import Packer
    from d3core.samplers.plan import RowPlan

    model = build_model("dream", "tiny", seed=0, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2,
                        intermediate_size=512).to("cuda", dtype).eval()
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (3, 96))
    plans = [RowPlan(0, 96, 96), RowPlan(0, 40, 40), RowPlan(10, 70, 70)]  # three key spans: a padding mask
    cache = KVCache.for_model(model, 3, 96)
    w, _ = Packer(torch.device("cuda"), cache.capacity).windows(tokens, plans, np.array([0, 1, 2]),
                                                                 np.array([95, 39, 69]))
    assert w.key_mask is not None
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        logits = model.forward_windows(w, cache)
    assert torch.isfinite(logits).all()
