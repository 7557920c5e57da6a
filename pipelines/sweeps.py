"""Sweep axes: what each parallel sampler's evaluation sweep varies, under one unambiguous name each.

``fast_dllm`` commits tokens whose probability is at least a *confidence* (higher: stricter, fewer
tokens per step); ``dparallel`` and ``d3llm`` commit tokens whose *entropy* (nats) is at most a
threshold (lower: stricter). The samplers' params classes call both ``threshold``; every config,
command line, saved recipe and report names the axis: ``fast_dllm.confidence_threshold``,
``dparallel.entropy_threshold``, ``d3llm.entropy_threshold``, and ``vanilla`` (no axis).
"""

from __future__ import annotations

import logging

logger = logging.getLogger("d3ray.evaluate")

DLLM_SAMPLERS = ("vanilla", "fast_dllm", "dparallel", "d3llm")
# What each sampler's sweep varies, by its one unambiguous name: "SAMPLER.AXIS" keys of ``sweeps``.
# fast_dllm commits tokens whose probability is >= a confidence (higher: stricter, fewer per step);
# dparallel and d3llm commit tokens whose entropy is <= a threshold in nats (lower: stricter).
SWEEP_AXES: dict[str, tuple[str, str]] = {
    "fast_dllm": ("confidence_threshold", "threshold"),
    "dparallel": ("entropy_threshold", "threshold"),
    "d3llm": ("entropy_threshold", "threshold"),
}
AXIS_MEANING = {"confidence_threshold": "a probability in (0, 1], higher is stricter",
                "entropy_threshold": "in nats, lower is stricter"}
VANILLA = "vanilla"  # the one-token-per-step reference: a sweep key without an axis
# Fields every sampler shares with the run's decode shape, set by gen_length / block_length only.
SHAPE_FIELDS = ("gen_length", "block_length")


def sweep_key(sampler: str) -> str:
    return VANILLA if sampler == VANILLA else f"{sampler}.{SWEEP_AXES[sampler][0]}"


def split_sweep_key(key: str) -> tuple[str, str | None]:
    """``"d3llm.entropy_threshold"`` -> ("d3llm", "entropy_threshold"); refuses an unnamed or unknown axis."""
    if key == VANILLA:
        return VANILLA, None
    sampler, _, axis = key.partition(".")
    if sampler not in SWEEP_AXES:
        raise ValueError(f"sweeps has {key!r}: sweepable samplers are {DLLM_SAMPLERS} (the AR baseline comes from "
                         f"ar_model); write one of {[VANILLA, *map(sweep_key, SWEEP_AXES)]}")
    want = SWEEP_AXES[sampler][0]
    if axis != want:
        raise ValueError(f"sweeps has {key!r}: {sampler} sweeps its {want} ({AXIS_MEANING[want]}); "
                         f"write {sampler}.{want}=...")
    return sampler, axis
