"""Token choice from logits: one pass for token, probability, entropy and log-probability.

Only the slots that can commit this step reach here (the engine asks the model for their
logits alone), as an ``(NL, V)`` matrix. Softmax runs once in float32; the chosen token's
probability is read from it, the entropy comes from the log-sum-exp identity on the
max-shifted logits ``c = z - max(z)``: ``H = logsumexp(c) - <softmax(c), c>`` — two non-negative
terms, so no cancellation and no ``log p`` buffer — and the log-probability of the chosen
token is ``log p``. Sampling is Gumbel-max in float64 (LLaDA's numerics) with
*counter-based* noise: each uniform is a hash of (row seed, row step, slot, vocabulary id), so
a row's samples depend on its own seed only, never on which other rows share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF
# Odd multipliers below 2**31: a 32-bit value times one stays inside int64, on every backend.
_MUL_A, _MUL_B = 0x7FEB352D, 0x2C1B3C6D
_GOLDEN = 0x9E3779B1  # spreads consecutive vocabulary ids (ids < 2**18 keep the product inside int64)
_SALT_HI, _SALT_WORD2, _SALT_UNIFORM = 0x1B873593, 0x68E31DA5, 0x3C6EF372


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 tensors holding values in ``[0, 2**32)``."""
    x = x ^ (x >> 16)
    x = (x * _MUL_A) & _M32
    x = x ^ (x >> 15)
    x = (x * _MUL_B) & _M32
    return x ^ (x >> 16)


def cell_keys(seeds: torch.Tensor, steps: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per logit slot from its row's seed (any int64), the row's step and the slot."""
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    key = _mix(lo ^ _mix(hi ^ _SALT_HI))
    key = _mix(key ^ (steps & _M32))
    return _mix(key ^ (slots & _M32))


def _uniform(words_a: torch.Tensor, words_b: torch.Tensor) -> torch.Tensor:
    """float64 uniforms in (0, 1) with 53 random bits from two 32-bit words."""
    bits = (words_a >> 5) * (1 << 26) + (words_b >> 6)
    return (bits.double() + 0.5) / float(1 << 53)


def uniform_per_cell(keys: torch.Tensor) -> torch.Tensor:
    """One uniform per logit slot (for random remasking)."""
    a = _mix(keys ^ _SALT_UNIFORM)
    return _uniform(a, _mix(a ^ _SALT_WORD2))


def gumbel_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """``(NL, vocab)`` float64 Gumbel noise, a pure function of the keys."""
    ids = torch.arange(vocab, device=keys.device, dtype=torch.long)
    a = _mix((keys[:, None] + ids[None] * _GOLDEN) & _M32)
    u = _uniform(a, _mix(a ^ _SALT_WORD2))
    return -torch.log(-torch.log(u))


@dataclass(frozen=True)
class TokenStats:
    tokens: torch.Tensor  # (NL,) chosen token
    conf: torch.Tensor  # (NL,) its probability under softmax(logits)
    logprob: torch.Tensor  # (NL,) log of conf
    entropy: torch.Tensor | None  # (NL,) predictive entropy in nats, when asked for


def token_stats(
    logits: torch.Tensor,
    temperature: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    want_entropy: bool = False,
    forbid: int | None = None,
) -> TokenStats:
    """Choose a token per row of ``logits (NL, V)``.

    ``temperature`` is ``None`` when every slot decodes greedily (argmax); otherwise a
    ``(NL,)`` float64 tensor, 0 meaning argmax for that slot, and ``keys`` the slots' noise keys.
    ``forbid`` (the mask id) is never chosen: where it wins, the runner-up is taken instead, while
    probabilities and entropy stay those of the model's full distribution.
    """
    z = logits.float()
    shifted = z - z.amax(dim=-1, keepdim=True) if want_entropy else z
    probs = torch.softmax(shifted, dim=-1)  # the same bits either way: the kernel subtracts the same max
    if temperature is None:
        tokens = choose(logits, forbid)
    else:
        if keys is None:
            raise ValueError("token_stats: sampling (temperature given) needs the slots' noise keys")
        noise = gumbel_noise(keys, logits.shape[-1])
        scaled = logits.double() / temperature.clamp_min(1e-12)[:, None] + noise
        tokens = torch.where(temperature > 0, choose(scaled, forbid), choose(logits, forbid))
    conf = probs.gather(-1, tokens[:, None]).squeeze(-1)
    ent = _entropy(shifted, probs) if want_entropy else None
    return TokenStats(tokens, conf, torch.log(conf), ent)


def choose(scores: torch.Tensor, forbid: int | None) -> torch.Tensor:
    """Argmax over the last dim, except that ``forbid`` loses to the runner-up."""
    if forbid is None:
        return scores.argmax(dim=-1)
    return scores.index_fill(-1, _index(forbid, scores.device), -float("inf")).argmax(dim=-1)


_INDEX: dict[tuple[int, torch.device], torch.Tensor] = {}


def _index(i: int, device: torch.device) -> torch.Tensor:
    """A cached one-element index tensor, made once per device by a fill (no host-to-device copy)."""
    key = (i, device)
    if key not in _INDEX:
        with torch.inference_mode(False):  # a plain tensor, whatever mode the first caller is in
            _INDEX[key] = torch.full((1,), i, dtype=torch.long, device=device)
    return _INDEX[key]


def _entropy(shifted: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``logsumexp(c) - <softmax(c), c>`` for max-shifted logits ``c`` (both terms >= 0), the dot
    product as a batched GEMV (no product buffer)."""
    shape, v = shifted.shape[:-1], shifted.shape[-1]
    dot = torch.bmm(probs.reshape(-1, 1, v), shifted.reshape(-1, v, 1)).view(shape)
    return torch.logsumexp(shifted, dim=-1) - dot


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Predictive entropy in nats of ``logits (..., V)``, as :func:`token_stats` computes it."""
    z = logits.float()
    shifted = z - z.amax(dim=-1, keepdim=True)
    return _entropy(shifted, torch.softmax(shifted, dim=-1))
