"""``ar``: greedy (or sampled) autoregressive decoding with a KV cache, for AR baselines.

Drives any HF causal LM (``LlamaForCausalLM`` for the embedded baseline) on a left-padded
batch: one prefill forward, then one forward per new token with ``past_key_values``,
stopping a row at its first EOS and the batch when every row has stopped. It keeps the
samplers' contract (``on_step`` snapshots mark undecided slots with ``-1``; ``verifier`` is
ignored); vLLM is the fast path for AR baselines (:mod:`d3core.eval.vllm_ar`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from d3core.samplers.base import DecodeParams, GenerationResult, SequenceResult, validate_prompts
from d3core.samplers.generation import OnStep, Snapshot, committed_length, row_seeds
from d3core.samplers.logits import cell_keys, token_stats

UNDECIDED = -1  # marks slots not generated yet in on_step snapshots


@dataclass(frozen=True)
class ARParams(DecodeParams):
    pass


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
    on_step: OnStep | None = None,
    verifier: torch.nn.Module | None = None,
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
    logprobs = torch.zeros(b, params.gen_length, dtype=torch.float32, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    nfe = torch.zeros(b, dtype=torch.long, device=device)
    next_pos = positions[:, -1] + 1
    eos_t = torch.tensor(eos, device=device)
    seeds = torch.tensor(row_seeds(b, generator), device=device)
    temperature = torch.full((b,), float(params.temperature), dtype=torch.float64, device=device)
    for step in range(params.gen_length):
        nfe += (~done).long()
        if params.temperature > 0:
            keys = cell_keys(seeds, torch.full_like(seeds, step), torch.zeros_like(seeds))
            stats = token_stats(logits, temperature, keys)
        else:
            stats = token_stats(logits)
        tok = torch.where(done, torch.full_like(stats.tokens, eos[0]), stats.tokens)
        tokens[:, step] = tok
        logprobs[:, step] = torch.where(done, torch.zeros_like(stats.logprob), stats.logprob)
        done |= torch.isin(tok, eos_t)
        if on_step is not None:
            _notify(on_step, tokens, step, eos)
        if bool(done.all()) or step == params.gen_length - 1:
            break
        attn = torch.cat([attn, torch.ones(b, 1, dtype=attn.dtype, device=device)], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                    past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
        next_pos = next_pos + 1
    steps = list(range(params.gen_length))
    sequences = [SequenceResult(list(map(int, p)), t, n, steps, eos, lp, len(p) + n)
                 for p, t, n, lp in zip(prompts, tokens.tolist(), nfe.tolist(), logprobs.tolist())]
    return GenerationResult(sequences, time.perf_counter() - t0, {"sampler": "ar"})


def _notify(on_step: OnStep, tokens: torch.Tensor, step: int, eos: tuple[int, ...]) -> None:
    gen = tokens.cpu().numpy().copy()
    gen[:, step + 1:] = UNDECIDED
    committed = [committed_length(g, UNDECIDED, eos) for g in gen]
    on_step(Snapshot(torch.from_numpy(gen), UNDECIDED, committed,
                     [c < step + 1 for c in committed]))
