"""Load a random-init official-shape checkpoint, saved sharded in bf16, from disk onto a GPU; decode a few steps.

    python benchmarks/load_checkpoint.py --dir /scratch/llada-8b-random --out runs/bench/load_llada8b.json
    python benchmarks/load_checkpoint.py --arch dream --size dream-7b --dir /scratch/dream-7b-random

Writes the checkpoint first if ``--dir`` holds none (LLaDA-8B: 16.03 GB in 4 shards of <= 5 GB,
the same tensors and total size as GSAI-ML/LLaDA-8B-Instruct's index), one shard of random
weights at a time. The load then runs in a fresh interpreter, so its peak host memory (VmHWM
after resetting it through /proc/self/clear_refs) is the load's own; peak GPU memory is
``torch.cuda.max_memory_allocated``. Finally it decodes ``--decode-steps`` steps of one block
with the ``vanilla`` sampler (a random model: the tokens are noise, the point is that the loaded
weights run). Without CUDA it prints a skip line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
import torch
from d3core.models.checkpoint import load_pretrained
from d3core.samplers import get_sampler

def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

path, steps = sys.argv[1], int(sys.argv[2])
torch.zeros(1, device="cuda")  # CUDA context first: not part of the load
before = vm("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
model = load_pretrained(path, device="cuda", dtype=torch.bfloat16)
torch.cuda.synchronize()
load_s = time.perf_counter() - t0
out = {"load_seconds": load_s, "host_peak_growth_bytes": vm("VmHWM") - before,
       "gpu_peak_bytes": torch.cuda.max_memory_allocated(),
       "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
       "params": sum(p.numel() for p in model.parameters()),
       "dtypes": sorted({str(p.dtype) for p in model.parameters()}), "gpu": torch.cuda.get_device_name()}
spec = get_sampler("vanilla")
params = spec.params_cls(gen_length=32, block_length=32, steps=steps)
prompt = list(range(100, 116))
with torch.no_grad():
    spec.generate(model, [prompt], params)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = spec.generate(model, [prompt], params)
    torch.cuda.synchronize()
seq = result.sequences[0]
out.update(decode_seconds=time.perf_counter() - t0, decode_nfe=seq.nfe, decoded_tokens=len(seq.tokens),
           gpu_peak_bytes_with_decode=torch.cuda.max_memory_allocated())
print(json.dumps(out))
"""


def write_random_checkpoint(arch: str, size: str, path: str, seed: int = 0) -> dict:
    """A random-init checkpoint of the named official shape, bf16, sharded at 5 GB; one shard in memory at a time."""
    import torch

    from d3core.models.checkpoint import official_specs, write_config
    from d3core.models.registry import preset
    from d3core.models.safetensors_io import DEFAULT_MAX_SHARD_BYTES, plan_shards, write_shards

    cfg = preset(arch, size)
    specs = official_specs(cfg, torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)

    def fetch(shard):
        out = {}
        for s in shard:
            if s.name.endswith("norm.weight") or ".ln_f." in s.name or "layernorm" in s.name:
                out[s.name] = torch.ones(s.shape, dtype=s.dtype)
            else:
                out[s.name] = (torch.randn(s.shape, generator=gen) * 0.02).to(s.dtype)
        return out

    t0 = time.perf_counter()
    write_config(path, cfg, torch.bfloat16)
    names = write_shards(path, plan_shards(specs, DEFAULT_MAX_SHARD_BYTES), fetch)
    return {"write_seconds": time.perf_counter() - t0, "files": names,
            "bytes": sum(s.nbytes for s in specs), "tensors": len(specs)}


def run(arch: str, size: str, path: str, decode_steps: int = 4) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA GPU: this benchmark loads onto a GPU"}
    report: dict = {"arch": arch, "size": size, "dir": path}
    if not (Path(path) / "config.json").exists():
        report["written"] = write_random_checkpoint(arch, size, path)
    proc = subprocess.run([sys.executable, "-c", CHILD, path, str(decode_steps)], cwd=ROOT, capture_output=True,
                          text=True, timeout=1800, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise RuntimeError(f"load child failed ({proc.returncode}): {proc.stderr[-3000:]}")
    report.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return report


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="llada", choices=("llada", "dream"))
    p.add_argument("--size", default="llada-8b", help="an official size: llada-8b or dream-7b")
    p.add_argument("--dir", required=True, help="local directory for the random checkpoint (~16 GB)")
    p.add_argument("--decode-steps", type=int, default=4, help="vanilla steps over one 32-token block")
    p.add_argument("--out", default="", help="write the JSON report here too")
    args = p.parse_args(argv)
    report = run(args.arch, args.size, args.dir, args.decode_steps)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
