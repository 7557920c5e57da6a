"""What every sampler shares: the batch layout, the result record and the token choice.

A batch of prompts of different lengths is left-padded into one tensor of slots
``[pad | prompt | generation]``; padding is excluded from attention by a key mask and
positions start at 0 on each row's first real token, so a row decodes the same tokens
alone or in a batch (at temperature 0). Every sampler returns a :class:`GenerationResult`
with, per sequence, the committed tokens, the number of model forwards it took part in
(NFE) and the step at which each generated position was unmasked.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

logger = logging.getLogger(__name__)


@dataclass
class SequenceResult:
    """One decoded sequence. ``tokens`` covers every generation slot, EOS tail included."""

    prompt_ids: list[int]
    tokens: list[int]
    nfe: int
    unmask_step: list[int]
    eos_ids: tuple[int, ...] = ()

    @property
    def response_ids(self) -> list[int]:
        """Generated tokens up to (not including) the first EOS."""
        for i, t in enumerate(self.tokens):
            if t in self.eos_ids:
                return self.tokens[:i]
        return list(self.tokens)

    @property
    def num_generated(self) -> int:
        """Tokens that count as generated for TPF (d3LLM: the response, EOS excluded)."""
        return len(self.response_ids)

    @property
    def tpf(self) -> float:
        return self.num_generated / max(self.nfe, 1)


@dataclass
class GenerationResult:
    sequences: list[SequenceResult]
    wall_time: float
    stats: dict = field(default_factory=dict)

    @property
    def total_nfe(self) -> int:
        return sum(s.nfe for s in self.sequences)

    @property
    def tpf(self) -> float:
        """Generated tokens / forwards over the batch (d3LLM's TPF)."""
        return sum(s.num_generated for s in self.sequences) / max(self.total_nfe, 1)

    @property
    def tokens_per_second(self) -> float:
        return sum(s.num_generated for s in self.sequences) / max(self.wall_time, 1e-9)


@dataclass
class Batch:
    """Left-padded slots of a prompt batch with room for ``gen_length`` generated tokens."""

    x: torch.Tensor  # (B, P + G) token ids; generation slots start as mask
    positions: torch.Tensor  # (B, P + G)
    attention_mask: torch.Tensor  # (B, P + G) False on left padding
    prompt_len: int  # P, the padded prompt width
    gen_length: int


def validate_prompts(prompts: Sequence[Sequence[int]], gen_length: int, max_seq_len: int, vocab_size: int) -> None:
    if len(prompts) == 0:
        raise ValueError("prompts is empty: pass at least one prompt (a list of token ids)")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if len(p) + gen_length > max_seq_len:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; with gen_length={gen_length} that is {len(p) + gen_length} "
                f"> the model's context {max_seq_len}: shorten the prompt or the generation"
            )
        bad = [t for t in p if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids {bad[:4]} outside the vocabulary [0, {vocab_size})")


def make_batch(
    prompts: Sequence[Sequence[int]], gen_length: int, mask_id: int, pad_id: int, device: torch.device | str = "cpu"
) -> Batch:
    width = max(len(p) for p in prompts)
    b = len(prompts)
    total = width + gen_length
    x = torch.full((b, total), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(b, total, dtype=torch.bool)
    positions = torch.zeros(b, total, dtype=torch.long)
    for i, p in enumerate(prompts):
        pad = width - len(p)
        x[i, pad:width] = torch.as_tensor(list(p), dtype=torch.long)
        attention_mask[i, pad:] = True
        positions[i, pad:] = torch.arange(total - pad)
    x[:, width:] = mask_id
    return Batch(x.to(device), positions.to(device), attention_mask.to(device), width, gen_length)


def choose_tokens(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token choice and the probability of the chosen token under ``softmax(logits)``.

    Temperature 0 is argmax; otherwise Gumbel-max sampling in float64 (LLaDA's numerics),
    drawing noise from ``generator`` so runs are reproducible.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    if temperature <= 0:
        tokens = logits.argmax(dim=-1)
    else:
        u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
        tokens = (logits.double() / temperature + gumbel).argmax(dim=-1)
    return tokens, probs.gather(-1, tokens[..., None]).squeeze(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Predictive entropy in nats (float32; 0 * log 0 counts as 0)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def check_probability(name: str, value: float, low: float = 0.0, high: float = 1.0) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name}={value}: must lie in [{low}, {high}]")


def check_blocks(gen_length: int, block_length: int) -> None:
    if gen_length <= 0 or block_length <= 0:
        raise ValueError(f"gen_length={gen_length}, block_length={block_length}: both must be positive")
    if gen_length % block_length:
        raise ValueError(
            f"block_length={block_length} does not divide gen_length={gen_length}: "
            "pick a block length that divides the generation length"
        )


def begin(model: torch.nn.Module, prompts: Sequence[Sequence[int]], gen_length: int) -> tuple[Batch, float]:
    """Validate the prompts against the model and lay out the batch; returns it and the start time."""
    cfg = model.config
    validate_prompts(prompts, gen_length, cfg.max_seq_len, cfg.vocab_size)
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    return make_batch(prompts, gen_length, cfg.mask_id, cfg.pad_id, device), t0


def finish(
    name: str,
    prompts: Sequence[Sequence[int]],
    generated: torch.Tensor,
    nfe: Sequence[int] | torch.Tensor,
    unmask_step: torch.Tensor,
    eos_ids: Sequence[int],
    t0: float,
    **stats,
) -> GenerationResult:
    """Package per-row outputs (``generated``: the generation slots) into a GenerationResult."""
    nfe = nfe.tolist() if isinstance(nfe, torch.Tensor) else list(nfe)
    sequences = [
        SequenceResult(list(map(int, prompts[i])), generated[i].tolist(), int(nfe[i]), unmask_step[i].tolist(),
                       tuple(eos_ids))
        for i in range(len(prompts))
    ]
    return GenerationResult(sequences, time.perf_counter() - t0, {"sampler": name, **stats})
