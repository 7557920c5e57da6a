"""The bidirectional transformer shared by LLaDA and Dream.

Both architectures are pre-norm LLaMA-style stacks (RMSNorm, rotary embeddings, SwiGLU,
untied head) without a causal mask; they differ in parameter names, QKV biases, grouped
KV heads and the logit shift, all of which live in :class:`ModelConfig` and in each
architecture's checkpoint mapping. One forward serves both: token ids, absolute positions,
an optional key-padding mask and an optional :class:`~d3core.cache.KVCache`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from d3core.cache import KVCache
from d3core.models.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (B, 1, T, head_dim) for the rotate-half RoPE convention."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, D/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        kv_dim = cfg.num_kv_heads * cfg.head_dim
        self.q = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.qkv_bias)
        self.k = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.v = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.o = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
        store: bool,
        start: int | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            if start is None:
                k, v = cache.prefix_and_window(layer, k, v, store)
            else:
                k, v = cache.around(layer, start, k, v)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.o(out.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, rope, key_mask, cache, layer, store, start):
        x = x + self.attn(self.attn_norm(x), rope, key_mask, cache, layer, store, start)
        return x + self.mlp(self.mlp_norm(x))


class DiffusionTransformer(nn.Module):
    """A bidirectional dLLM: ``forward(ids, positions, ...) -> logits for those positions``.

    Subclasses (one per architecture) only add the official checkpoint layout.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def mask_id(self) -> int:
        return self.config.mask_id

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self.config.eos_ids

    @property
    def shift_logits(self) -> bool:
        return self.config.shift_logits

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        commit: int | torch.Tensor = 0,
        start: int | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, T, V)`` predicting the tokens at the given slots.

        Args:
            input_ids: ``(B, T)`` tokens of the window ``[cache.length, cache.length + T)``
                (or ``[0, T)`` without a cache).
            positions: ``(B, T)`` absolute positions for RoPE; default ``arange`` from the window start.
            attention_mask: ``(B, T)`` bool, False for left padding that no one may attend to.
            cache: per-row prefix K/V to attend to (see :mod:`d3core.cache`).
            commit: grow the cached prefixes with this window's K/V: an int ``n`` commits the
                window's first ``n`` slots for every row, a ``(B,)`` tensor gives each row's new
                absolute prefix length.
            start: slot of the first token when it lies *inside* the cached range (dual cache):
                the tokens stand in for cached slots ``[start, start + T)`` for this forward only.
        """
        b, t = input_ids.shape
        device = input_ids.device
        dual = cache is not None and start is not None and start != cache.length
        if cache is None and (start not in (None, 0) or (isinstance(commit, int) and commit)):
            raise ValueError(f"start={start}, commit={commit} need a cache; pass cache=KVCache.for_model(...)")
        if dual:
            if not cache.uniform or not 0 <= start < cache.length:
                raise ValueError(f"start={start}: a dual-cache window must start inside [0, {cache.length}) "
                                 "with every row cached to the same length")
            if not (isinstance(commit, int) and commit == 0):
                raise ValueError(f"commit={commit} with start={start}: a dual-cache window cannot commit")
        window_start = 0 if cache is None else (start if dual else cache.length)
        targets = None
        if cache is not None and not dual:
            if isinstance(commit, int):
                if not 0 <= commit <= t:
                    raise ValueError(f"commit={commit}: must lie in [0, {t}] (the number of slots in this call)")
                targets = torch.full((b,), window_start + commit, device=device) if commit else None
            else:
                targets = commit.to(device)
            cache.begin_window(t)
        if positions is None:
            positions = torch.arange(window_start, window_start + t, device=device).expand(b, t)
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.bool, device=device)
        if cache is None:
            key_mask = attention_mask
        elif dual:
            key_mask = cache.mask_around(start, attention_mask)
        else:
            key_mask = torch.cat([cache.key_mask[:, :window_start], attention_mask], dim=1)
        if bool(key_mask.all()):
            key_mask = None
        rope = rotary_tables(positions, self.config.head_dim, self.config.rope_theta)
        x = self.embed(input_ids)
        for i, block in enumerate(self.layers):
            x = block(x, rope, key_mask, cache, i, targets is not None, start if dual else None)
        h = self.norm(x)
        if cache is not None and not dual:
            h = cache.window_hidden(h)
        if self.config.shift_logits:
            # Slot i is predicted from slot i-1; a row's first real slot (nothing real before
            # it, as after left padding) keeps its own output, Dream's convention for slot 0.
            if cache is not None and window_start > 0:
                first = cache.hidden_before(window_start)[:, None]
                prev_real = cache.key_mask[:, window_start - 1: window_start]
            else:
                first = h[:, :1]
                prev_real = torch.zeros(b, 1, dtype=torch.bool, device=device)
            shifted = torch.cat([first, h[:, :-1]], dim=1)
            prev_real = torch.cat([prev_real, attention_mask[:, :-1]], dim=1)
            shifted = torch.where(prev_real[..., None], shifted, h)
        else:
            shifted = h
        if cache is not None and not dual:
            cache.end_window(h, attention_mask, targets)
        return self.head(shifted)
