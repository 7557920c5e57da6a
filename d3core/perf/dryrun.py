"""Decode steps at real 8B shape on fake CUDA tensors: memory, FLOPs and bytes per step, with no GPU.

The engine's own code runs: the sampler's host planning, packing, the packed-window forward of an
official-shape model (all layers, bf16, real vocabulary) with its KV cache, token statistics and
the sampler's commit rule, all on fake ``device="cuda"`` tensors (:mod:`d3core.perf.fakecuda`).
A fake tensor has no values, so the step's decisions are *scripted* on the host: each row commits
its first ``tpf`` candidate slots per step (the schedule of ``benchmarks/gpu_decode.py``), which
drives the real block, cache and refresh machinery through a whole decode. The commit rule still
runs on the device, so its cost is counted.

Per step it records FLOPs (:class:`~torch.utils.flop_counter.FlopCounterMode`), op-level bytes by
kind and per-op rooflines (:class:`~d3core.perf.costs.OpCosts`), the tokens computed, and the
fake device's peak memory (:class:`~torch.distributed._tools.mem_tracker.MemTracker`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils.flop_counter import FlopCounterMode

from d3core.perf.costs import KINDS, OpCosts
from d3core.perf.devices import DEVICES, DeviceSpec
from d3core.perf.fakecuda import DryLink, fake_cuda, fake_model
from d3core.samplers.engine import Decoder, Program


class ScriptedDecoder(Decoder):
    """A decoder whose step decisions come from a host script: each row commits its first ``tpf`` candidates."""

    def __init__(self, *args, tpf: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if tpf < 1:
            raise ValueError(f"tpf={tpf}: a scripted step commits at least one slot per row")
        self.tpf = tpf
        self.committed = self.real_tokens = 0
        self.filler = next(t for t in range(self.model.config.vocab_size)
                           if t not in (self.mask_id, self.pad_id, *self.eos_ids))

    def fetch(self, out: torch.Tensor) -> np.ndarray:
        step = self._last_step
        layout = step.layout
        cand = step.parts["cand"].reshape(layout.n, layout.ns * layout.seg).astype(bool)
        take = cand & (np.cumsum(cand, axis=1) <= self.tpf)
        tokens = np.where(take, self.filler, -1).astype(np.int32).reshape(-1)
        self.committed = int(take[: len(self.rows)].sum())
        return np.stack([tokens, np.zeros_like(tokens)])

    def segment_step(self, rows, plans, steps):
        self.real_tokens = sum(max(p.end - p.start, 0) for p in plans)
        return super().segment_step(rows, plans, steps)


@dataclass
class StepRow:
    """One dry-run step."""

    rows: int
    tokens: int  # window tokens recomputed (padding included)
    real_tokens: int  # window tokens the rows asked for
    cells: int  # logit cells (rows x segments x segment length, padding included)
    committed: int
    flops: float
    bytes: dict[str, float]
    op_roofline_ms: dict[str, float]


@dataclass
class CaseResult:
    name: str
    arch: str
    batch: int
    steps: list[StepRow] = field(default_factory=list)
    peak_bytes: float = 0.0
    devices_seen: set[str] = field(default_factory=set)
    weight_bytes: float = 0.0
    cache_bytes: float = 0.0
    wall_s: float = 0.0

    def summary(self, devices: dict[str, DeviceSpec] = DEVICES) -> dict:
        n = max(len(self.steps), 1)
        committed = sum(s.committed for s in self.steps)
        flops = sum(s.flops for s in self.steps)
        kinds = {k: sum(s.bytes[k] for s in self.steps) / n for k in KINDS}
        computed = sum(s.real_tokens for s in self.steps)
        out = {"case": self.name, "arch": self.arch, "batch": self.batch, "steps": len(self.steps),
               "committed": committed, "tpf": committed / self.batch / n,
               "tokens_per_step": sum(s.tokens for s in self.steps) / n,
               "real_tokens_per_step": computed / n,
               "token_forwards_per_committed_token": computed / max(committed, 1),
               "gflops_per_step": flops / n / 1e9, "gb_per_step": {k: v / 1e9 for k, v in kinds.items()},
               "gflops_per_committed_token": flops / max(committed, 1) / 1e9,
               "gb_per_committed_token": sum(kinds.values()) * n / max(committed, 1) / 1e9,
               "weight_gb": self.weight_bytes / 1e9, "cache_gb": self.cache_bytes / 1e9,
               "peak_gb": self.peak_bytes / 1e9, "devices_seen": sorted(self.devices_seen),
               "dry_run_wall_s": self.wall_s}
        fused = self.weight_bytes + sum(s.bytes["kv"] for s in self.steps) / n + \
            sum(s.bytes["logits"] for s in self.steps) / n
        for name, dev in devices.items():
            step_s = max(flops / n / dev.bf16_flops, fused / dev.bandwidth)
            op_s = sum(s.op_roofline_ms[name] for s in self.steps) / n / 1e3
            out[name] = {"fits": self.peak_bytes <= dev.memory, "compute_ms": flops / n / dev.bf16_flops * 1e3,
                         "memory_ms": fused / dev.bandwidth * 1e3, "step_roofline_ms": step_s * 1e3,
                         "op_roofline_ms": op_s * 1e3, "weight_floor_ms": self.weight_bytes / dev.bandwidth * 1e3,
                         "tokens_per_s_step_roofline": committed / n / step_s,
                         "tokens_per_s_op_roofline": committed / n / op_s}
        return out


def _peak(tracker: MemTracker) -> float:
    snapshot = tracker.get_tracker_snapshot("peak")
    return float(max((v.get("Total", 0) for k, v in snapshot.items() if str(k).startswith("cuda")), default=0))


def dry_decode(name: str, arch: str, size: str, program: Program, params, prompts: list[list[int]], tpf: int,
               joins: list[int] | None = None, rows: int | None = None, capacity: int | None = None,
               layers: int | None = None, max_steps: int = 400,
               devices: dict[str, DeviceSpec] = DEVICES) -> CaseResult:
    """Decode ``prompts`` to the end on a fake-CUDA ``arch``/``size`` model with scripted commits.

    ``params`` is one parameter set or one per prompt; ``joins[i]`` (default 0) is the step before which
    prompt ``i`` joins (a serving engine's mixed rows); ``rows`` and ``capacity`` size the decoder (default:
    every prompt at once, the longest prompt); ``layers`` overrides the model's layer count (smoke runs)."""
    joins = joins or [0] * len(prompts)
    per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    rows = rows or len(prompts)
    capacity = capacity or max(len(p) + q.gen_length for p, q in zip(prompts, per_prompt))
    t0 = time.perf_counter()
    result = CaseResult(name, arch, len(prompts))
    with fake_cuda():
        tracker = MemTracker()
        with tracker:
            model = fake_model(arch, size, **({"num_layers": layers} if layers else {}))
            decoder = ScriptedDecoder(model, program, rows, capacity, graphs="off", buckets=True, tpf=tpf)
            decoder.packer.link = DryLink(decoder.device)
            cache = [t for t in (decoder.cache.keys, decoder.cache.values, decoder.cache.hidden) if t is not None]
            result.weight_bytes = float(sum(p.numel() * p.element_size() for p in model.parameters()))
            result.cache_bytes = float(sum(t.numel() * t.element_size() for t in cache))
            queue = sorted(range(len(prompts)), key=lambda i: joins[i])
            step = 0
            while (queue or decoder.rows) and step < max_steps:
                while queue and joins[queue[0]] <= step and len(decoder.rows) < rows:
                    i = queue.pop(0)
                    decoder.add(prompts[i], per_prompt[i])
                tracker.reset_mod_stats()
                costs = OpCosts(devices, list(model.parameters()), cache, model.config.vocab_size)
                with FlopCounterMode(display=False) as flops, costs:
                    report = decoder.step()
                step += 1
                result.devices_seen |= costs.devices_seen
                if not report.forwarded:
                    continue
                last = decoder._last_step
                result.steps.append(StepRow(len(decoder.rows) + len(report.finished), last.shape.tokens,
                                            decoder.real_tokens, last.shape.n * last.shape.ns * last.shape.seg,
                                            decoder.committed,
                                            float(flops.get_total_flops()), dict(costs.record.bytes),
                                            {k: v * 1e3 for k, v in costs.record.op_roofline_s.items()}))
        result.peak_bytes = _peak(tracker)
    result.wall_s = time.perf_counter() - t0
    return result

