"""Supervised training data and losses for the embedded models (pure tensors, no Ray).

* :func:`masked_diffusion_loss` is LLaDA's SFT objective: the prompt stays clean, each
  response slot (EOS padding included) is masked with probability ``t ~ U(eps, 1)``, and the
  cross-entropy on masked slots is weighted by ``1 / t`` and divided by the response length.
* :func:`ar_loss` is next-token cross-entropy on the response and its EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from d3core.samplers.base import make_batch

MASK_EPS = 1e-3


def encode_prompt(tokenizer, question: str) -> list[int]:
    """Chat-templated prompt ids (the template already carries BOS)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_response(tokenizer, answer: str) -> list[int]:
    return tokenizer(answer, add_special_tokens=False)["input_ids"]


@dataclass
class DiffusionBatch:
    x0: torch.Tensor  # (B, P + G) clean tokens, response padded with EOS
    positions: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    gen_length: int


def collate_diffusion(
    prompts: Sequence[list[int]], responses: Sequence[list[int]], gen_length: int, eos_id: int, pad_id: int,
    mask_id: int,
) -> DiffusionBatch:
    for i, r in enumerate(responses):
        if len(r) >= gen_length:
            raise ValueError(f"response {i} has {len(r)} tokens: gen_length={gen_length} must leave room for EOS")
    batch = make_batch(prompts, gen_length, mask_id, pad_id)
    x0 = batch.x.clone()
    x0[:, batch.prompt_len:] = eos_id
    for i, r in enumerate(responses):
        x0[i, batch.prompt_len: batch.prompt_len + len(r)] = torch.as_tensor(r)
    return DiffusionBatch(x0, batch.positions, batch.attention_mask, batch.prompt_len, gen_length)


def masked_diffusion_loss(
    model: torch.nn.Module, batch: DiffusionBatch, generator: torch.Generator | None = None
) -> torch.Tensor:
    """LLaDA SFT loss; ``t`` is stratified over the batch to lower its variance."""
    x0 = batch.x0
    b = x0.shape[0]
    resp = x0[:, batch.prompt_len:]
    u = (torch.arange(b, dtype=torch.float32) + torch.rand(b, generator=generator)) / b
    u = u[torch.randperm(b, generator=generator)]
    p_mask = (1 - MASK_EPS) * u + MASK_EPS
    masked = torch.rand(resp.shape, generator=generator) < p_mask[:, None]
    xt = x0.clone()
    xt[:, batch.prompt_len:] = torch.where(masked, torch.full_like(resp, model.config.mask_id), resp)
    logits = model(xt, batch.positions, batch.attention_mask)[:, batch.prompt_len:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), resp.reshape(-1), reduction="none")
    ce = ce.view(b, -1) * masked / p_mask[:, None]
    return ce.sum() / (b * batch.gen_length)


def collate_ar(
    prompts: Sequence[list[int]], responses: Sequence[list[int]], eos_id: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded ``prompt + response + EOS`` with labels only on the response and EOS."""
    seqs = [list(p) + list(r) + [eos_id] for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    attn = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, : len(s)] = torch.as_tensor(s)
        labels[i, len(p): len(s)] = torch.as_tensor(s[len(p):])
        attn[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def ar_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
