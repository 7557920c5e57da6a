"""Shards stream tensor by tensor: peak host memory of a load is bounded, and loaded weights own their memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from d3core.models.checkpoint import load_pretrained, save_pretrained
from d3core.models.registry import build_model

ROOT = Path(__file__).resolve().parents[3]

# Runs in a fresh interpreter so nothing else the test session allocated muddies the number.
# A tiny checkpoint is loaded first: the one-off lazy imports (torch's meta kernels, safetensors)
# are library start-up, not the cost of loading; then the peak-RSS mark is reset
# (/proc/self/clear_refs, "5") and the big checkpoint is loaded.
CHILD = r"""
import json, sys, time
import torch
from d3core.models.checkpoint import load_pretrained

def status():
    return {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/status")
            if l.startswith(("VmRSS", "VmHWM"))}

big, small, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
load_pretrained(small)
before = status()["VmRSS"]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
t0 = time.perf_counter()
model = load_pretrained(big, dtype=None if dtype == "none" else getattr(torch, dtype))
seconds = time.perf_counter() - t0
peak = status()["VmHWM"]
print(json.dumps({"growth": peak - before, "seconds": seconds,
                  "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                  "dtypes": sorted({str(p.dtype) for p in model.parameters()})}))
"""


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """A random LLaDA-layout checkpoint of ~340 MB (fp32) in 4 shards; the largest tensor is 64 MiB."""
    root = tmp_path_factory.mktemp("big")
    model = build_model("llada", "tiny", seed=0, vocab_size=16384, hidden_size=1024, num_layers=4, num_heads=8,
                        num_kv_heads=8, intermediate_size=2816)
    save_pretrained(model, str(root / "big"), max_shard_bytes=100 * 2**20)
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    del model
    save_pretrained(build_model("llada", "tiny", seed=0, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                                intermediate_size=64), str(root / "small"))
    return root / "big", root / "small", largest


def _clear_refs_works() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("dtype", ["none", "bfloat16"])
def test_peak_rss_growth_is_model_plus_one_tensor(big_checkpoint, dtype):
    if not _clear_refs_works():
        pytest.skip("/proc/self/clear_refs is not writable here: the peak RSS mark cannot be reset")
    big, small, largest = big_checkpoint
    assert len(list(big.glob("model-*-of-00004.safetensors"))) == 4
    out = subprocess.run([sys.executable, "-c", CHILD, str(big), str(small), dtype], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["dtypes"] == (["torch.float32"] if dtype == "none" else ["torch.bfloat16"])
    bound = 1.2 * (m["model_bytes"] + largest)
    # reading each shard whole (the previous loader) peaks at the model plus a whole shard and its copy
    assert m["growth"] <= bound, f"peak RSS grew {m['growth'] / 2**20:.0f} MiB > bound {bound / 2**20:.0f} MiB"
    assert m["growth"] >= m["model_bytes"]  # the measurement sees the weights themselves


def test_loaded_weights_do_not_alias_the_files(tmp_path):
    """safe_open memory-maps: a loader that kept mapped tensors would change (or crash) when the files are rewritten."""
    first = build_model("llada", "tiny", seed=0, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                        intermediate_size=64).eval()
    save_pretrained(first, str(tmp_path), max_shard_bytes=50_000)
    loaded = load_pretrained(str(tmp_path))
    save_pretrained(build_model(first.config, seed=1), str(tmp_path), max_shard_bytes=50_000)  # same files, new data
    ids = torch.tensor([[3, 8, 13, 21]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), first(ids))


@pytest.mark.parametrize("where", ["file", "memory"])
def test_sharded_bf16_round_trip_and_dtype_on_load(tmp_path, where):
    import fsspec

    model = build_model("dream", "tiny", seed=0, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_size=64).eval()
    uri = str(tmp_path / "bf16") if where == "file" else "memory://d3ray-stream/bf16"
    save_pretrained(model, uri, max_shard_bytes=12_000, dtype=torch.bfloat16)
    fs, root = fsspec.core.url_to_fs(uri)
    try:
        with fs.open(root + "/config.json") as f:
            assert json.load(f)["torch_dtype"] == "bfloat16"
        assert len([p for p in fs.ls(root, detail=False) if p.endswith(".safetensors")]) > 2
        as_saved = load_pretrained(uri)
        assert {p.dtype for p in as_saved.parameters()} == {torch.bfloat16}
        upcast = load_pretrained(uri, dtype=torch.float32)
        for (name, a), b in zip(upcast.named_parameters(), model.parameters()):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b.to(torch.bfloat16).float(), rtol=0, atol=0, msg=name)
    finally:
        if where == "memory":
            fs.rm("/d3ray-stream", recursive=True)
