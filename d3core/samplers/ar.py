"""``ar``: greedy (or sampled) autoregressive decoding with a KV cache, for AR baselines.

Drives any HF causal LM (``LlamaForCausalLM`` for the embedded baseline) on a left-padded
batch: one prefill forward, then one forward per new token with ``past_key_values``,
stopping a row at its first EOS and the batch when every row has stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from d3core.samplers.base import GenerationResult, choose_tokens, finish, validate_prompts

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ARParams:
    gen_length: int = 48
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if self.gen_length <= 0:
            raise ValueError(f"gen_length={self.gen_length}: must be positive")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")


def _eos_ids(model) -> tuple[int, ...]:
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = eos if eos is not None else model.config.eos_token_id
    return (eos,) if isinstance(eos, int) else tuple(eos)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    params: ARParams = ARParams(),
    generator: torch.Generator | None = None,
) -> GenerationResult:
    cfg = model.config
    validate_prompts(prompts, params.gen_length, cfg.max_position_embeddings, cfg.vocab_size)
    device = next(model.parameters()).device
    eos = _eos_ids(model)
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else eos[0]
    t0 = time.perf_counter()
    b, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros(b, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p))
        attn[i, width - len(p):] = 1
    ids, attn = ids.to(device), attn.to(device)
    positions = (attn.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True)
    past = out.past_key_values
    logits = out.logits[:, -1]
    tokens = torch.full((b, params.gen_length), eos[0], dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    nfe = torch.zeros(b, dtype=torch.long, device=device)
    next_pos = positions[:, -1] + 1
    eos_t = torch.tensor(eos, device=device)
    for step in range(params.gen_length):
        nfe += (~done).long()
        tok, _ = choose_tokens(logits, params.temperature, generator)
        tok = torch.where(done, torch.full_like(tok, eos[0]), tok)
        tokens[:, step] = tok
        done |= torch.isin(tok, eos_t)
        if bool(done.all()) or step == params.gen_length - 1:
            break
        attn = torch.cat([attn, torch.ones(b, 1, dtype=attn.dtype, device=device)], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                    past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
        next_pos = next_pos + 1
    steps = torch.arange(params.gen_length, device=device).expand(b, -1)
    return finish("ar", prompts, tokens, nfe, steps, eos, t0)
