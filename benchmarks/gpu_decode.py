"""One prepared GPU check of the decode engine at LLaDA-8B scale (<= 8 minutes on one GPU).

    python benchmarks/gpu_decode.py --out $OUT/gpu_decode.json              # on a GPU machine
    python benchmarks/gpu_decode.py --device cpu --layers 1 --shape tiny --prompt 32 --out /tmp/x.json   # smoke

1. The weight-read floor: the bandwidth of a large device-to-device copy, measured here, and the
   model's weight bytes; ``floor_ms = weight_bytes / bandwidth`` (a step must read every weight once).
2. A random LLaDA-8B-shape model in bf16 (``--layers`` of 32; random weights have no meaningful
   entropy, so the commit schedule is *scripted*: d3llm's block and delayed-cache machinery runs
   unchanged, but each row commits its first ``--tpf`` in-flight masked slots per step), at batch 1
   and 8, gen 256 / block 32, prompt ``--prompt`` tokens: ms per step (median over repeats) against
   the floor, tokens/s at the scripted TPF, and whether CUDA graphs replayed. Steps run under
   ``torch.cuda.set_sync_debug_mode("error")``: any host sync in a step fails the run.
3. The tiny-model sampler table (accuracy, TPF, tokens/s at batch 1 and 8) on the same device.

A run fails on any row error, on a committed mask, on fewer committed slots than ``gen_length``, and on
more steps than the scripted schedule takes on the host (its TPF). Graphs are captured by a warm-up
decode outside sync-debug mode; ``captures_while_timed`` should be 0. Both rooflines are reported:
compute (FLOPs per step from FlopCounterMode over the achieved bf16 matmul rate) and memory (weight
bytes over the measured copy bandwidth).

Target: step <= 1.3x the weight-read floor at batch 1 on an H200, i.e. >= 2,000 tok/s at TPF 9.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is no package: bench_json by name
from bench_json import write_json  # noqa: E402

logger = logging.getLogger("d3ray.bench.gpu_decode")


def copy_bandwidth(device: torch.device, gib: float) -> float:
    """Bytes per second of a large device copy (read + write counted)."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        seconds = min(times)
    else:
        t0 = time.perf_counter()
        dst.copy_(src)
        seconds = time.perf_counter() - t0
    return 2 * n * 2 / seconds


def random_model(shape: str, layers: int, device: torch.device, dtype: torch.dtype):
    from d3core.models.registry import build_model

    # Built in its own dtype on the meta device, then given memory once: no fp32 copy of 8B weights (32 GB)
    # next to the bf16 one.
    model = build_model("llada", shape, device="meta", dtype=dtype, **({"num_layers": layers} if layers else {}))
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def scripted_program(tpf: int):
    """d3llm's host machinery with a scripted device rule: each row commits its first ``tpf`` candidates."""
    from d3core.samplers.d3llm import D3LLMProgram

    class Scripted(D3LLMProgram):
        name = "d3llm-scripted"
        needs_entropy = True  # keep the real rule's logits work

        def rule(self, cells):
            super().rule(cells)  # run (and drop) the real rule so the step costs what a real one does
            n = cells.cand.shape[0]
            flat = cells.cand.view(n, -1)
            return (flat & (flat.long().cumsum(-1) <= tpf)).view_as(cells.cand)

    return Scripted()


def schedule_steps(program, params, prompts: list[list[int]], tpf: int, model) -> int:
    """Steps the scripted schedule takes, from the engine's host logic alone (d3core/perf/hosttime.py)."""
    from d3core.perf.hosttime import ZeroCostDecoder

    d = ZeroCostDecoder(model, program, len(prompts), max(map(len, prompts)) + params.gen_length, tpf=tpf)
    for p in prompts:
        d.add(p, params)
    steps = 0
    while d.rows:
        steps += d.step().forwarded
    return steps


def time_decode(model, program, params, batch: int, prompt_len: int, repeats: int, device: torch.device,
                tpf: int, host_model) -> dict:
    """Decode ``batch`` random prompts ``repeats`` times on one decoder (graphs captured by a warm-up decode).

    Fails when a row ends with an error, commits a mask or fewer slots than ``gen_length``, or when the
    steps exceed the scripted schedule's."""
    from d3core.samplers.engine import Decoder

    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, min(vocab, 100_000), (batch, prompt_len), generator=gen).tolist()
    d = Decoder(model, program, rows=batch, capacity=prompt_len + params.gen_length)
    expected = schedule_steps(program, params, prompts, tpf, host_model)

    def decode(debug_syncs: bool) -> tuple[float, int, int]:
        rows = [d.add(p, params) for p in prompts]
        steps = 0
        if device.type == "cuda":
            torch.cuda.synchronize()
            if debug_syncs:
                torch.cuda.set_sync_debug_mode("error")
        t0 = time.perf_counter()
        try:
            while d.rows:
                steps += d.step().forwarded
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        wall = time.perf_counter() - t0
        errors = [r.error for r in rows if r.error]
        if errors:
            raise RuntimeError(f"batch {batch}: a row ended with an error: {errors[0]}")
        committed = sum(sum(t != model.config.mask_id for t in r.result.tokens) for r in rows)
        if committed != batch * params.gen_length:
            raise RuntimeError(f"batch {batch}: {committed} of {batch * params.gen_length} slots committed")
        if steps > expected:
            raise RuntimeError(f"batch {batch}: {steps} steps where the scripted schedule takes {expected} "
                               f"(TPF {committed / batch / steps:.2f} below the schedule's "
                               f"{params.gen_length / expected:.2f})")
        return wall, steps, committed

    decode(debug_syncs=False)  # warm-up outside sync-debug mode: captures every step shape
    captures_before = d.graphs.captures if d.graphs is not None else 0
    runs = [decode(debug_syncs=True) for _ in range(repeats)]
    ms = [1000 * w / s for w, s, _ in runs]
    tokens, steps = runs[0][2], runs[0][1]
    out = {"batch": batch, "steps": steps, "schedule_steps": expected, "tpf": tokens / batch / max(steps, 1),
           "ms_per_step": statistics.median(ms), "ms_per_step_all": ms,
           "tokens_per_second": tokens / statistics.median([w for w, _, _ in runs])}
    if d.graphs is not None:
        out.update(graph_captures=d.graphs.captures, graph_replays=d.graphs.replays,
                   captures_while_timed=d.graphs.captures - captures_before)
    return out


def matmul_flops(device: torch.device, n: int = 8192) -> float:
    """Achieved bf16 FLOP/s of a large square matmul (the compute side of the roofline)."""
    if device.type != "cuda":
        return 0.0
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    end.synchronize()
    return 10 * 2 * n ** 3 / (start.elapsed_time(end) / 1000)


def step_flops(model, program, params, prompt_len: int, batch: int) -> float:
    """FLOPs of one decode's steps on the device, averaged per step (torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    from d3core.samplers.engine import Decoder

    vocab = min(model.config.vocab_size, 100_000)
    prompts = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(7)).tolist()
    d = Decoder(model, program, rows=batch, capacity=prompt_len + params.gen_length, graphs=False, buckets=True)
    for p in prompts:
        d.add(p, params)
    steps = 0
    with FlopCounterMode(display=False) as counter:
        while d.rows:
            steps += d.step().forwarded
    return counter.get_total_flops() / max(steps, 1)


def tiny_table(device: torch.device) -> list[dict]:
    from d3core.eval import synthetic
    from d3core.eval.harness import evaluate_synthetic
    from d3core.models.shipped import load_tiny_ar, load_tiny_teacher, load_tiny_tokenizer
    from d3core.samplers import get_sampler
    from d3core.sft import encode_prompt

    teacher, ar, tok = load_tiny_teacher(device=str(device)), load_tiny_ar(device=str(device)), load_tiny_tokenizer()
    problems = synthetic.generate("test", 200, seed=0)
    speed_prompts = [encode_prompt(tok, p.question) for p in problems[:32]]
    rows = []
    for name, kw in [("vanilla", {}), ("fast_dllm", {"threshold": 0.9, "cache": "dual"}),
                     ("dparallel", {"threshold": 0.5}), ("d3llm", {"threshold": 0.5}),
                     ("d3llm", {"threshold": 0.5, "cache_delay_iter": 2}), ("d3llm", {"threshold": 1.0,
                                                                                     "cache_delay_iter": 2})]:
        spec = get_sampler(name)
        params = spec.params_cls(**kw)
        acc = evaluate_synthetic(teacher, tok, name, params, problems, batch_size=100, verifier=ar)
        row = {"sampler": name, "params": kw, "accuracy": acc.accuracy, "tpf": acc.tpf}
        for b in (1, 8):
            spec.generate(teacher, speed_prompts[:b], params)
            t0, generated = time.perf_counter(), 0
            for i in range(0, len(speed_prompts), b):
                res = spec.generate(teacher, speed_prompts[i:i + b], params)
                generated += sum(s.num_generated for s in res.sequences)
            row[f"batch{b}_tokens_per_second"] = generated / (time.perf_counter() - t0)
        rows.append(row)
        logger.info("tiny %s %s acc %.3f TPF %.2f b1 %.0f b8 %.0f tok/s", name, kw, row["accuracy"], row["tpf"],
                    row["batch1_tokens_per_second"], row["batch8_tokens_per_second"])
    return rows


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench/gpu_decode.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="llada-8b", choices=["llada-8b", "tiny"])
    parser.add_argument("--layers", type=int, default=0, help="layers of the random model (0: the shape's own)")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens of the random-model rows")
    parser.add_argument("--tpf", type=int, default=9, help="scripted tokens committed per row per step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copy-gib", type=float, default=4.0)
    parser.add_argument("--skip-tiny", action="store_true")
    args = parser.parse_args()
    if args.tpf < 1 or args.repeats < 1 or args.prompt < 1 or args.layers < 0:
        parser.error("--tpf, --repeats and --prompt must be >= 1 and --layers >= 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible: run on a GPU machine or pass --device cpu")
    from d3core.samplers.d3llm import D3LLMParams

    out: dict = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "shape": args.shape, "scripted_tpf": args.tpf}
    t_start = time.perf_counter()
    bandwidth = copy_bandwidth(device, args.copy_gib)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(args.shape, args.layers, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    floor_ms = 1000 * weight_bytes / bandwidth
    out.update(copy_bandwidth_gbps=bandwidth / 1e9, weight_bytes=weight_bytes, floor_ms=floor_ms,
               layers=model.config.num_layers, dtype=str(dtype))
    logger.info("copy bandwidth %.0f GB/s, weights %.2f GB, floor %.2f ms/step", bandwidth / 1e9,
                weight_bytes / 1e9, floor_ms)
    gen = 256 if args.shape == "llada-8b" else 48
    params = D3LLMParams(gen_length=gen, block_length=32 if gen == 256 else 16, threshold=0.5, cache_delay_iter=1,
                         early_stop=False)
    out["scripted"] = []
    flops_rate = matmul_flops(device)
    out["matmul_tflops"] = flops_rate / 1e12
    from d3core.perf.hosttime import zero_cost_model

    host_model = zero_cost_model("llada", args.shape) if args.shape != "tiny" else None
    for batch in (1, 8):
        program = scripted_program(args.tpf)
        row = time_decode(model, program, params, batch, args.prompt, args.repeats, device, args.tpf,
                          host_model or model)
        row["vs_floor"] = row["ms_per_step"] / floor_ms
        row["flops_per_step"] = step_flops(model, scripted_program(args.tpf), params, args.prompt, batch)
        row["compute_roofline_ms"] = 1000 * row["flops_per_step"] / flops_rate if flops_rate else None
        row["memory_roofline_ms"] = floor_ms  # every weight read once per step (KV and logits add little here)
        out["scripted"].append(row)
        logger.info("batch %d: %.2f ms/step (%.2fx floor), TPF %.2f, %.0f tok/s, rooflines compute %s / memory "
                    "%.2f ms, captures while timed %s", batch, row["ms_per_step"], row["vs_floor"], row["tpf"],
                    row["tokens_per_second"], row["compute_roofline_ms"], floor_ms,
                    row.get("captures_while_timed"))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_tiny:
        out["tiny"] = tiny_table(device)
    out["wall_s"] = time.perf_counter() - t_start
    write_json(args.out, out)


if __name__ == "__main__":
    main()
