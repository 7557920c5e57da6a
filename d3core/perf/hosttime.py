"""The engine's own time per step (planning, packing, applying) with a device part that costs nothing.

On a GPU a decode step is: host planning and packing, one upload, the device part (a graph replay),
one read of the decisions, host applying. The host parts cannot overlap the device part (the next
plan needs this step's decisions), so they add to every step. :class:`ZeroCostDecoder` keeps every
host part of a graph-replayed step (planning, :func:`~d3core.samplers.packing.build_segment_step`,
the copy of the packed arrays into a static buffer, applying the decisions, the sampler's ``after``)
and replaces the device part and the read with scripted decisions, whose own time is not counted.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from d3core.models.registry import build_model
from d3core.perf.dryrun import ScriptedDecoder
from d3core.samplers.engine import Program
from d3core.samplers.plan import StepMeta


class ZeroCostDecoder(ScriptedDecoder):
    """A scripted decoder whose device part is only the graph path's buffer refresh; ``scripted_s`` is the
    time spent producing the scripted decisions (to subtract: on a GPU the device makes them)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, graphs="off", buckets=True, **kwargs)
        self._buffer = torch.empty(1 << 16, dtype=torch.long)
        self._out = torch.zeros(1, dtype=torch.int32)
        self.scripted_s = 0.0

    def _eager_meta(self, step) -> StepMeta | None:
        size = sum(np.asarray(a).size for a in step.parts.values())
        if self._buffer.numel() < size:
            self._buffer = torch.empty(size, dtype=torch.long)
        self.packer.upload(step.parts, into=self._buffer)  # what a replay's refresh costs the host
        return None

    def _segment_device(self, meta) -> torch.Tensor:
        return self._out

    def fetch(self, out: torch.Tensor) -> np.ndarray:
        t0 = time.perf_counter()
        decisions = super().fetch(out)
        self.scripted_s += time.perf_counter() - t0
        return decisions


def zero_cost_model(arch: str, size: str) -> torch.nn.Module:
    """``arch``/``size``'s special ids, vocabulary and context with one narrow layer (the host work does not
    depend on the width; the cache stays small)."""
    return build_model(arch, size, num_layers=1, hidden_size=64, num_heads=2, num_kv_heads=2,
                       intermediate_size=64).eval()


def host_ms_per_step(model: torch.nn.Module, program: Program, params, batch: int, prompt_len: int, tpf: int,
                     repeats: int = 3) -> dict:
    """Median over ``repeats`` decodes of the engine's host time per step at ``batch`` rows."""
    rng = np.random.default_rng(batch)
    prompts = rng.integers(0, min(model.config.vocab_size, 100_000), (batch, prompt_len)).tolist()
    decoder = ZeroCostDecoder(model, program, batch, prompt_len + params.gen_length, tpf=tpf)
    per_step, steps = [], 0
    for _ in range(repeats + 1):  # the first decode warms up
        for p in prompts:
            decoder.add(p, params)
        decoder.scripted_s, steps = 0.0, 0
        t0 = time.perf_counter()
        while decoder.rows:
            steps += decoder.step().forwarded
        per_step.append((time.perf_counter() - t0 - decoder.scripted_s) / max(steps, 1))
    ms = [1e3 * s for s in per_step[1:]]
    return {"batch": batch, "steps": steps, "host_ms_per_step": statistics.median(ms), "host_ms_all": ms}
