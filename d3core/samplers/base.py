"""What every sampler shares: parameters, prompt validation and the result record.

Every sampler returns a :class:`GenerationResult` with, per sequence, the committed tokens,
the number of model forwards it took part in (NFE), the step at which each generated position
was unmasked and the log-probability it had then. :func:`make_batch` is the left-padded
``[pad | prompt | generation]`` layout of whole-sequence forwards (training, scoring);
decoding lays each row out on its own (see :mod:`d3core.samplers.engine`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class SequenceResult:
    """One decoded sequence. ``tokens`` covers every generation slot, EOS tail included."""

    prompt_ids: list[int]
    tokens: list[int]
    nfe: int
    unmask_step: list[int]
    eos_ids: tuple[int, ...] = ()
    logprobs: list[float] | None = None  # per slot: log-probability of the token when it was committed
    tokens_computed: int = 0  # window tokens the model recomputed for this sequence, over all its forwards

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

    @property
    def forwards_per_token(self) -> float:
        """Token-forwards per committed token: the tokens computed over all forwards divided by the generation
        slots (each slot is committed once, by the model or by the EOS fill). A device-independent cost."""
        return self.tokens_computed / max(len(self.tokens), 1)


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
    def forwards_per_token(self) -> float:
        """Token-forwards per committed token over the batch (see :attr:`SequenceResult.forwards_per_token`)."""
        return sum(s.tokens_computed for s in self.sequences) / max(sum(len(s.tokens) for s in self.sequences), 1)

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


class PromptError(ValueError):
    """A prompt the model cannot decode; ``code`` names the rule (OpenAI's error codes)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def validate_prompts(prompts: Sequence[Sequence[int]], gen_length: int, max_seq_len: int, vocab_size: int,
                     name: str = "prompt") -> None:
    """Every prompt is non-empty, fits ``gen_length`` slots in the context and holds vocabulary ids only.

    The one prompt check: the library's ``generate()``, the decoder and the HTTP edge all use it.
    Raises :class:`PromptError` naming the prompt (``name`` and its index when there are several)."""
    if len(prompts) == 0:
        raise PromptError(f"{name}s is empty: pass at least one prompt (a list of token ids)", "empty_prompt")
    for i, p in enumerate(prompts):
        which = name if len(prompts) == 1 and name != "prompt" else f"{name} {i}"
        if len(p) == 0:
            raise PromptError(f"{which} is empty: every prompt needs at least one token", "empty_prompt")
        if len(p) + gen_length > max_seq_len:
            raise PromptError(
                f"{which} has {len(p)} tokens; with gen_length={gen_length} that is {len(p) + gen_length} "
                f"> the model's context {max_seq_len}: shorten the prompt or the generation", "context_length_exceeded")
        bad = [t for t in p if not 0 <= int(t) < vocab_size]
        if bad:
            raise PromptError(f"{which} has token ids {bad[:4]} outside the vocabulary [0, {vocab_size})",
                              "invalid_token")


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


@dataclass(frozen=True)
class DecodeParams:
    """Fields every sampler takes: generation slots and sampling temperature (0 is argmax)."""

    gen_length: int = 48
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.gen_length, int) or self.gen_length <= 0:
            raise ValueError(f"gen_length={self.gen_length!r}: must be a positive int")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 is argmax)")


@dataclass(frozen=True)
class BlockParams(DecodeParams):
    """Block-decoding samplers: the generation slots split into blocks of ``block_length``."""

    block_length: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        check_blocks(self.gen_length, self.block_length)

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length
