"""``apd``: adaptive parallel decoding (Israel et al., 2025) with a small AR verifier.

Strictly left to right: each iteration the dLLM drafts the next masked positions
``[curr, curr + M)`` in one forward; the AR model (same tokenizer) scores the draft in one
cached forward; the longest prefix on which the draft agrees with the product-of-experts
mixture ``p_dLLM^R * p_AR^(1-R)`` is accepted (its first token always). Knobs:

* ``mixture_weight`` R: the dLLM's weight (higher accepts more);
* ``kv_window`` W: with a dLLM KV cache, slots older than ``curr - W - accepted + 1`` are read
  from the cache and the rest recomputed (None: no dLLM cache);
* ``max_lookahead`` M: how many masked positions the dLLM sees and drafts (None: all);
* ``coupling``: ``argmax`` accepts while the draft equals the mixture's argmax (what the
  reference code ships); ``shared_gumbel`` samples the mixture target with the draft's own
  Gumbel noise (the evident intent). They coincide at temperature 0.

NFE counts dLLM forwards; verifier forwards are reported in ``stats["verifier_forwards"]``.
Rows of a batch keep their own ``curr`` and cache lengths; the verifier's cache is cropped to
the shortest accepted prefix, which is exact because causal keys depend only on the prefix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from d3core.cache import KVCache
from d3core.samplers.base import GenerationResult, begin, check_probability, finish

logger = logging.getLogger(__name__)

COUPLINGS = ("argmax", "shared_gumbel")


@dataclass(frozen=True)
class APDParams:
    gen_length: int = 48
    mixture_weight: float = 0.7
    kv_window: int | None = 16
    max_lookahead: int | None = None
    coupling: str = "argmax"
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if self.gen_length <= 0:
            raise ValueError(f"gen_length={self.gen_length}: must be positive")
        check_probability("mixture_weight", self.mixture_weight)
        if self.kv_window is not None and self.kv_window < 0:
            raise ValueError(f"kv_window={self.kv_window}: must be >= 0, or None for no dLLM cache")
        if self.max_lookahead is not None and self.max_lookahead < 1:
            raise ValueError(f"max_lookahead={self.max_lookahead}: must be >= 1, or None for all masked positions")
        if self.coupling not in COUPLINGS:
            raise ValueError(f"coupling={self.coupling!r}: must be one of {COUPLINGS}")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 is argmax)")


def _gumbel(shape, generator, device) -> torch.Tensor:
    u = torch.rand(shape, dtype=torch.float64, device=device, generator=generator)
    return -torch.log(-torch.log(u.clamp_min(1e-300)))


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    params: APDParams = APDParams(),
    generator: torch.Generator | None = None,
    verifier: torch.nn.Module | None = None,
) -> GenerationResult:
    if verifier is None:
        raise ValueError("apd needs verifier=<a small AR model with the same tokenizer>, e.g. the tiny AR baseline")
    cfg = model.config
    batch, t0 = begin(model, prompts, params.gen_length)
    device = batch.x.device
    x, pos, attn, p0 = batch.x, batch.positions, batch.attention_mask, batch.prompt_len
    b, total = x.shape
    vocab = min(cfg.vocab_size, verifier.config.vocab_size)
    eos = torch.tensor(cfg.eos_ids, device=device)
    curr = torch.full((b,), p0, dtype=torch.long, device=device)
    accepted = torch.zeros(b, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    nfe = torch.zeros(b, dtype=torch.long, device=device)
    unmask_step = torch.full((b, params.gen_length), -1, dtype=torch.long, device=device)
    cache = KVCache.for_model(model, b, total) if params.kv_window is not None else None
    v_cache = None
    slots = torch.arange(total, device=device)
    lookahead = params.max_lookahead or total
    verifier_forwards = 0
    while not bool(done.all()):
        right = torch.clamp(curr + lookahead, max=total)
        visible = attn & (slots[None] < right[:, None])
        if cache is None:
            logits = model(x, pos, visible)
            start = 0
        else:
            if cache.row_length.max() > 0:
                cache.truncate(torch.clamp(curr - params.kv_window - accepted + 1, min=0))
            start = cache.length
            logits = model(x[:, start:], pos[:, start:], visible[:, start:], cache=cache, commit=right)
        nfe += (~done).long()
        d_logits = logits[..., :vocab].double()
        noise = _gumbel(d_logits.shape, generator, device) if params.temperature > 0 else None
        scaled = d_logits / params.temperature + noise if noise is not None else d_logits
        draft_all = scaled.argmax(-1)  # (B, total - start) tokens for every window slot
        # The verifier predicts slot j from its output at j - 1 (causal, one cached forward).
        drafted = x.clone()
        window = slots[None] >= curr[:, None]
        in_draft = window & (slots[None] < right[:, None])
        drafted[:, start:] = torch.where(in_draft[:, start:], draft_all, x[:, start:])
        lo, hi = int(curr[~done].min()), int(right[~done].max())
        c0 = 0 if v_cache is None else lo - 1
        if v_cache is not None and v_cache.get_seq_length() > c0:
            v_cache.crop(c0 - v_cache.get_seq_length())  # keep only the accepted prefix [0, c0)
        v_out = verifier(input_ids=drafted[:, c0:hi], attention_mask=attn[:, :hi].long(),
                         position_ids=pos[:, c0:hi], past_key_values=v_cache, use_cache=True)
        v_cache = v_out.past_key_values
        verifier_forwards += 1
        v_win = v_out.logits[:, lo - 1 - c0: hi - 1 - c0, :vocab].double()  # predicts slots [lo, hi)
        mix = params.mixture_weight * torch.log_softmax(d_logits[:, lo - start: hi - start], -1) \
            + (1 - params.mixture_weight) * torch.log_softmax(v_win, -1)
        if params.coupling == "shared_gumbel" and noise is not None:
            mix = mix / params.temperature + noise[:, lo - start: hi - start]
        target = mix.argmax(-1)
        win = slots[lo:hi][None]
        agree = ((drafted[:, lo:hi] == target) | (win == curr[:, None])) & (win < right[:, None])
        run = torch.where(win < curr[:, None], torch.ones_like(agree), agree)
        reach = lo + run.long().cumprod(-1).sum(-1)  # first disagreeing slot
        n_acc = torch.where(done, torch.zeros_like(curr), torch.clamp(reach, max=right) - curr)
        take = window & (slots[None] < (curr + n_acc)[:, None]) & ~done[:, None]
        x = torch.where(take, drafted, x)
        unmask_step = torch.where(take[:, p0:], (nfe - 1)[:, None], unmask_step)
        curr = curr + n_acc
        accepted = n_acc
        hit_eos = (take & torch.isin(x, eos)).any(-1)
        fill = hit_eos[:, None] & (slots[None] >= curr[:, None])
        unmask_step = torch.where(fill[:, p0:] & (unmask_step < 0), (nfe - 1)[:, None], unmask_step)
        x = torch.where(fill, eos[0], x)
        done |= hit_eos | (curr >= total)
    return finish("apd", prompts, x[:, p0:], nfe, unmask_step, cfg.eos_ids, t0, verifier_forwards=verifier_forwards)
