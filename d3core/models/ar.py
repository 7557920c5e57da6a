"""The autoregressive baseline: a plain HF ``LlamaForCausalLM`` (so vLLM can serve it)."""

from __future__ import annotations

import torch


def tiny_ar_config():
    """A Llama of the same width and depth as the tiny dLLM, over the tiny tokenizer."""
    from transformers import LlamaConfig

    from d3core.models import tiny_tokenizer as vocab

    return LlamaConfig(
        vocab_size=vocab.VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=vocab.BOS_ID,
        eos_token_id=[vocab.EOS_ID, vocab.EOT_ID],
        pad_token_id=vocab.PAD_ID,
        torch_dtype="float32",
    )


def build_ar_model(seed: int | None = None):
    from transformers import LlamaForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_ar_config())


def load_ar_model(uri: str, device: str | torch.device = "cpu"):
    """Load an HF causal LM (``AutoModelForCausalLM``) from a local directory, hub id or ``hf://`` URI."""
    from transformers import AutoModelForCausalLM

    from d3core.models.hub import resolve_checkpoint

    return AutoModelForCausalLM.from_pretrained(resolve_checkpoint(uri), dtype=torch.float32).to(device).eval()
