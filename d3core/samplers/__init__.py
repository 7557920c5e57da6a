"""Decoding algorithms by name: ``get_sampler("vanilla")`` -> (params class, generate function).

Every sampler has one contract::

    generate(model, prompts, params, generator=None, on_step=None, verifier=None) -> GenerationResult

``generator`` seeds sampling (per-row seeds are drawn from it), ``on_step`` receives a
:class:`~d3core.samplers.generation.Snapshot` after every step (streaming), ``verifier`` is the
small AR model of samplers with ``needs_verifier`` (others ignore it). The dLLM samplers are
programs on :mod:`d3core.samplers.engine`; ``ar`` drives a Hugging Face causal LM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from d3core.samplers import apd, ar, d3llm, dparallel, fast_dllm, vanilla
from d3core.samplers.base import GenerationResult, SequenceResult


@dataclass(frozen=True)
class Sampler:
    name: str
    params_cls: type
    generate: Callable[..., GenerationResult]
    autoregressive: bool = False
    needs_verifier: bool = False

    def make_params(self, **kwargs: Any):
        return self.params_cls(**kwargs)


SAMPLERS: dict[str, Sampler] = {
    "vanilla": Sampler("vanilla", vanilla.VanillaParams, vanilla.generate),
    "fast_dllm": Sampler("fast_dllm", fast_dllm.FastDLLMParams, fast_dllm.generate),
    "dparallel": Sampler("dparallel", dparallel.DParallelParams, dparallel.generate),
    "d3llm": Sampler("d3llm", d3llm.D3LLMParams, d3llm.generate),
    "apd": Sampler("apd", apd.APDParams, apd.generate, needs_verifier=True),
    "ar": Sampler("ar", ar.ARParams, ar.generate, autoregressive=True),
}


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


__all__ = ["SAMPLERS", "Sampler", "get_sampler", "GenerationResult", "SequenceResult"]
