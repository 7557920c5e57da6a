"""Decode hot path: host<->device syncs, kernel-launching ops and host time per step, old vs new engine.

    python benchmarks/hotpath.py --out runs/bench/hotpath.json [--ref 18a9495] [--wide] [--rounds 3] \
        [--samplers vanilla,d3llm]

For every dLLM sampler at batch 1 and batch 8, on the shipped tiny teacher (and with ``--wide``
on a 2-layer LLaDA-8B-shape random model), one worker process per engine reports:

* ``syncs_in_forward`` / ``syncs_per_step``: calls of the entry points that read device data on
  the host or block on a host-to-device copy (``Tensor.item/tolist/__bool__/__int__/__float__/
  __index__/cpu``, ``nonzero``, ``masked_select``, boolean-mask indexing,
  ``torch.tensor/as_tensor`` of non-empty host data onto a device), counted by wrapping them; "in forward"
  are those made while the model's forward runs;
* ``kernel_ops_per_step``: non-view aten ops (what launches a kernel in eager mode), counted
  with a ``TorchDispatchMode``;
* ``cpu_ms_per_step``: this thread's CPU time per batch forward, and ``tokens_per_second``
  at batch 1 and 8 as ``benchmarks/samplers.py`` measures it.

``--ref COMMIT`` exports that commit's tree (``git archive``) into a temp dir, with this tree's tiny
teacher copied in (``--ref-own-weights`` keeps the commit's own), and runs the same worker on it; the two
engines' timing workers alternate ``--rounds`` times (A B A B ...) and the
medians are reported, so both see the same machine load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

logger = logging.getLogger("d3ray.bench.hotpath")

CONFIGS = [
    ("vanilla", {}),
    ("fast_dllm", {"threshold": 0.9, "cache": "prefix"}),
    ("fast_dllm", {"threshold": 0.9, "cache": "dual"}),
    ("dparallel", {"threshold": 0.5}),
    ("d3llm", {"threshold": 0.5}),
    ("d3llm", {"threshold": 0.5, "cache_delay_iter": 1}),
    ("apd", {"mixture_weight": 0.7, "kv_window": 16}),
]
WIDE = dict(gen_length=16, block_length=8)  # random 8B-shape weights: short decodes (one forced token per step)
# ``numpy`` is not counted: it works only on host tensors, so device data reaches it through a counted
# ``.cpu()`` first (``x.cpu().numpy()`` is one transfer, not two).
SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "nonzero",
                "masked_select")


class SyncCounter:
    """Wraps the Python entry points that synchronise on a GPU; counts calls, split by in/out of the forward."""

    def __init__(self) -> None:
        self.in_forward = self.total = 0
        self.depth = 0
        self._saved: list[tuple[object, str, object]] = []

    def _count(self) -> None:
        self.total += 1
        self.in_forward += self.depth > 0

    def _wrap(self, owner, name, pred=None) -> None:
        orig = getattr(owner, name)
        counter = self

        def wrapper(*args, **kwargs):
            if pred is None or pred(args, kwargs):
                counter._count()
            return orig(*args, **kwargs)

        self._saved.append((owner, name, orig))
        setattr(owner, name, wrapper)

    def __enter__(self):
        import torch

        for name in SYNC_METHODS:
            self._wrap(torch.Tensor, name)
        self._wrap(torch, "nonzero")
        self._wrap(torch, "masked_select")

        def host_data_to_device(args, kwargs):
            # Empty host data copies no bytes (``copy_`` returns at once for zero elements): not a sync.
            data = args[0] if args else kwargs.get("data")
            empty = (isinstance(data, (list, tuple)) and not data) or getattr(data, "size", 1) == 0
            return kwargs.get("device") is not None and not isinstance(data, torch.Tensor) and not empty

        self._wrap(torch, "tensor", host_data_to_device)
        self._wrap(torch, "as_tensor", host_data_to_device)

        def bool_index(args, kwargs):
            idx = args[1] if len(args) > 1 else None
            items = idx if isinstance(idx, tuple) else (idx,)
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)

        self._wrap(torch.Tensor, "__getitem__", bool_index)
        self._wrap(torch.Tensor, "__setitem__", bool_index)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, orig in reversed(self._saved):
            setattr(owner, name, orig)

    @contextlib.contextmanager
    def forward_scope(self, model_cls):
        """Mark calls made inside the model's forward(s)."""
        saved = []
        for name in ("forward", "forward_windows"):
            if not hasattr(model_cls, name):
                continue
            orig = getattr(model_cls, name)

            def make(orig):
                def wrapped(*args, **kwargs):
                    self.depth += 1
                    try:
                        return orig(*args, **kwargs)
                    finally:
                        self.depth -= 1
                return wrapped

            saved.append((name, orig))
            setattr(model_cls, name, make(orig))
        try:
            yield
        finally:
            for name, orig in saved:
                setattr(model_cls, name, orig)


def _op_counter():
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                self.ops += 1
            return func(*args, **(kwargs or {}))

    return OpCounter()


def _models(wide: bool):
    import torch

    from d3core.models.shipped import load_tiny_ar, load_tiny_teacher

    ar_model = load_tiny_ar()
    if not wide:
        return load_tiny_teacher(), ar_model
    from d3core.models.registry import build_model

    with torch.device("meta"):
        model = build_model("llada", "llada-8b", device="meta", num_layers=2)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p)) if name.endswith("norm.weight") else p.normal_(0, 0.02, generator=gen)
    # The tiny AR verifier has another vocabulary: APD is not run on the wide model.
    return model.eval(), None


def _prompts(tok, n):
    from d3core.eval import synthetic
    from d3core.sft import encode_prompt

    return [encode_prompt(tok, p.question) for p in synthetic.generate("test", n, seed=0)]


def worker(args) -> dict:
    """Measure every config on the engine importable from sys.path (run in its own process)."""
    import torch

    from d3core.models.layers import DiffusionTransformer
    from d3core.models.shipped import load_tiny_tokenizer
    from d3core.samplers import get_sampler

    torch.set_num_threads(args.threads)
    model, verifier = _models(args.wide)
    prompts = _prompts(load_tiny_tokenizer(), 16 if not args.wide else 8)
    rows = []
    for name, kwargs in CONFIGS:
        if (args.wide and name == "apd") or (args.samplers and name not in args.samplers.split(",")):
            continue
        spec = get_sampler(name)
        kw = dict(kwargs, **(WIDE if args.wide and name != "apd" else {}))
        params = spec.params_cls(**kw)
        extra = {"verifier": verifier} if spec.needs_verifier else {}
        row = {"sampler": name, "params": kw}
        for b in (1, 8):
            batch = prompts[:b]
            spec.generate(model, batch, params, **extra)  # warm-up
            out: dict = {}
            if not args.timing_only:
                with SyncCounter() as sync, sync.forward_scope(DiffusionTransformer):
                    res = spec.generate(model, batch, params, **extra)
                steps = res.stats.get("batch_forwards") or max(s.nfe for s in res.sequences)
                with _op_counter() as ops:
                    spec.generate(model, batch, params, **extra)
                out.update(steps=steps, syncs_in_forward=sync.in_forward / steps, syncs_per_step=sync.total / steps,
                           kernel_ops_per_step=ops.ops / steps)
            reps = 1 if args.wide else max(1, 16 // b)
            t_cpu, t_wall, generated, forwards = time.thread_time(), time.perf_counter(), 0, 0
            for i in range(reps):
                chunk = prompts[(i * b) % len(prompts):][:b] if b > 1 else [prompts[i % len(prompts)]]
                res = spec.generate(model, chunk, params, **extra)
                generated += sum(s.num_generated for s in res.sequences)
                forwards += res.stats.get("batch_forwards") or max(s.nfe for s in res.sequences)
            wall = time.perf_counter() - t_wall
            out.update(cpu_ms_per_step=1000 * (time.thread_time() - t_cpu) / forwards,
                       tokens_per_second=generated / wall)
            row[f"batch{b}"] = out
        rows.append(row)
        logger.info("%s %s done", name, kw)
    return {"rows": rows}


def _spawn(root: str, args, timing_only: bool) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--worker-out", path, "--threads", str(args.threads)]
    cmd += ["--wide"] if args.wide else []
    cmd += ["--timing-only"] if timing_only else []
    cmd += ["--samplers", args.samplers] if args.samplers else []
    env = dict(os.environ, PYTHONPATH=root)
    subprocess.run(cmd, cwd=root, env=env, check=True)
    with open(path) as f:
        return json.load(f)


def _export(ref: str, here: str, own_weights: bool) -> str:
    """``git archive`` of ``ref``; unless ``own_weights``, this tree's tiny teacher replaces the ref's, so both
    engines decode the same weights (same commits, same steps) and only the engine differs."""
    root = tempfile.mkdtemp(prefix=f"d3ray-{ref[:8]}-")
    archive = subprocess.run(["git", "archive", ref], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", root], input=archive, check=True)
    if not own_weights:
        teacher = os.path.join("d3core", "assets", "tiny", "teacher")
        shutil.rmtree(os.path.join(root, teacher), ignore_errors=True)
        shutil.copytree(os.path.join(here, teacher), os.path.join(root, teacher))
    return root


def _merge(counts: dict, timings: list[dict]) -> list[dict]:
    rows = counts["rows"]
    for i, row in enumerate(rows):
        for b in ("batch1", "batch8"):
            for key in ("cpu_ms_per_step", "tokens_per_second"):
                values = [t["rows"][i][b][key] for t in timings] + [row[b][key]]
                row[b][key] = statistics.median(values)
                row[b][key + "_all"] = values
    return rows


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench/hotpath.json")
    parser.add_argument("--ref", default="", help="git commit of the engine to compare against (e.g. 18a9495)")
    parser.add_argument("--ref-own-weights", action="store_true",
                        help="run the ref with the tiny teacher of its own commit (default: this tree's teacher)")
    parser.add_argument("--wide", action="store_true", help="a 2-layer LLaDA-8B-shape random model instead of tiny")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per engine")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samplers", default="",
                        help="comma-separated sampler names to run (default: all of " + ",".join(
                            sorted({name for name, _ in CONFIGS})) + ")")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--timing-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1 or args.threads < 1:
        parser.error(f"--rounds={args.rounds} and --threads={args.threads} must be >= 1")
    unknown = set(filter(None, args.samplers.split(","))) - {name for name, _ in CONFIGS}
    if unknown:
        parser.error(f"--samplers {args.samplers!r}: {sorted(unknown)} not among {sorted({n for n, _ in CONFIGS})}")
    if args.worker:
        with open(args.worker_out, "w") as f:
            json.dump(worker(args), f)
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    engines = {"new": here}
    if args.ref:
        engines["ref"] = _export(args.ref, here, args.ref_own_weights)
    counts = {name: _spawn(root, args, timing_only=False) for name, root in engines.items()}
    timings: dict[str, list[dict]] = {name: [] for name in engines}
    for _ in range(args.rounds - 1):
        for name, root in engines.items():  # A B A B ...
            timings[name].append(_spawn(root, args, timing_only=True))
    out = {
        "hardware": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                     "torch_threads": args.threads, "load_average": os.getloadavg()},
        "model": "llada-8b shape, 2 layers, random" if args.wide else "shipped tiny teacher",
        "ref": args.ref, "ref_weights": "own" if args.ref_own_weights else "this tree's", "rounds": args.rounds,
        "engines": {name: _merge(counts[name], timings[name]) for name in engines},
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    for name, rows in out["engines"].items():
        for row in rows:
            logger.info("%-4s %-9s %-44s b1 syncs %5.1f (fwd %4.1f) ops %6.1f %6.0f tok/s | b8 syncs %5.1f "
                        "(fwd %4.1f) ops %6.1f %6.0f tok/s", name, row["sampler"], json.dumps(row["params"]),
                        row["batch1"]["syncs_per_step"], row["batch1"]["syncs_in_forward"],
                        row["batch1"]["kernel_ops_per_step"], row["batch1"]["tokens_per_second"],
                        row["batch8"]["syncs_per_step"], row["batch8"]["syncs_in_forward"],
                        row["batch8"]["kernel_ops_per_step"], row["batch8"]["tokens_per_second"])
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
