"""The bidirectional transformer shared by LLaDA and Dream.

Both architectures are pre-norm LLaMA-style stacks (RMSNorm, rotary embeddings, SwiGLU,
untied head) without a causal mask; they differ in parameter names, QKV biases, grouped
KV heads and the logit shift, all of which live in :class:`ModelConfig` and in each
architecture's checkpoint mapping. Two entry points share the layers:

* :meth:`DiffusionTransformer.forward` — the whole padded sequence ``(B, T)`` at once, for
  training and for scoring (no cache);
* :meth:`DiffusionTransformer.forward_windows` — the decode path: per-row windows packed into
  one flat token list, K/V written in place into a :class:`~d3core.cache.KVCache`, logits only
  for the slots the engine asks for. It makes no device-to-host synchronisation: every shape
  comes from the host-built :class:`~d3core.cache.Windows`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from d3core.cache import KVCache, Windows
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


_INV_FREQ: dict[tuple[int, float, torch.device], torch.Tensor] = {}


def inverse_frequencies(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """RoPE's ``1 / theta^(2i / head_dim)``, computed once per (head_dim, theta, device)."""
    key = (head_dim, float(theta), device)
    if key not in _INV_FREQ:
        with torch.inference_mode(False):  # first made in a decode step, later read by training too
            _INV_FREQ[key] = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
                                              / head_dim))
    return _INV_FREQ[key]


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape ``positions.shape + (head_dim,)`` for the rotate-half RoPE convention."""
    angles = positions.to(torch.float32)[..., None] * inverse_frequencies(head_dim, theta, positions.device)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def attention_bias(key_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean key mask as the additive ``0 / -inf`` bias SDPA turns it into, made once per forward.

    SDPA converts a boolean mask on every call (three kernels per layer); the bias gives the
    same bits (the conversion's own values) for one conversion per forward."""
    if key_mask is None:
        return None
    return torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device).masked_fill_(~key_mask, -float("inf"))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA for ``q (B, H, T, D)`` against ``k, v (B, H_kv, S, D)``; returns ``(B, H, T, D)``.

    ``mask`` is a boolean key mask or its :func:`attention_bias` (broadcast over heads and queries).

    Grouped-query attention folds each KV group's query heads into the query length instead of
    broadcasting K/V (``enable_gqa``): the fused SDPA kernels accept that shape with a padding
    mask, where ``enable_gqa`` plus a mask falls back to the math kernel, and K/V are never
    repeated. Query head ``h`` uses KV head ``h // (H / H_kv)``, as in the official models.
    """
    b, h, t, d = q.shape
    h_kv = k.shape[1]
    if h_kv == h:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    group = h // h_kv
    folded = q.reshape(b, h_kv, group * t, d)
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask)
    return out.view(b, h, t, d)


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

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                key_mask: torch.Tensor | None) -> torch.Tensor:
        """Whole sequences: ``x (B, T, hidden)``, ``rope`` tables ``(B, 1, T, D)``, ``key_mask (B, 1, 1, T)``."""
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out = attend(q, k, v, key_mask)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))

    def forward_windows(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], w: Windows,
                        cache: KVCache, layer: int, key_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Packed windows: ``x (N, hidden)``, ``rope`` tables ``(N, 1, D)``; K/V go into the cache first.

        ``key_bias`` is ``w.key_mask`` as :func:`attention_bias` (the forward makes it once for every layer)."""
        if key_bias is None:
            key_bias = w.key_mask
        n_tok = x.shape[0]
        q = self.q(x).view(n_tok, self.num_heads, self.head_dim)
        k = self.k(x).view(n_tok, self.num_kv_heads, self.head_dim)
        v = self.v(x).view(n_tok, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if w.store:
            cache.write(layer, w.cache_index, k, v)
        if w.dense:  # whole rows: this forward's K/V are the keys, read in place
            def rows(t: torch.Tensor) -> torch.Tensor:
                return t.view(w.n, w.T, t.shape[1], self.head_dim).transpose(1, 2)

            out = attend(rows(q), rows(k), rows(v), key_bias)
            return self.o(out.transpose(1, 2).reshape(n_tok, -1))
        keys, values = cache.layer(layer)
        queries = q if w.aligned else q.index_select(0, w.q_index.view(-1))
        queries = queries.view(w.n, w.T, self.num_heads, self.head_dim).transpose(1, 2)
        out = attend(queries, keys[: w.n, : w.S].transpose(1, 2), values[: w.n, : w.S].transpose(1, 2), key_bias)
        out = out.transpose(1, 2).reshape(w.n * w.T, -1)
        return self.o(out if w.aligned else out.index_select(0, w.q_flat))


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

    def forward(self, x, rope, key_mask):
        x = x + self.attn(self.attn_norm(x), rope, key_mask)
        return x + self.mlp(self.mlp_norm(x))

    def forward_windows(self, x, rope, w: Windows, cache: KVCache, layer: int, key_bias: torch.Tensor | None = None):
        x = x + self.attn.forward_windows(self.attn_norm(x), rope, w, cache, layer, key_bias)
        return x + self.mlp(self.mlp_norm(x))


class DiffusionTransformer(nn.Module):
    """A bidirectional dLLM: ``forward(ids, positions, mask) -> logits`` and the packed decode forward.

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
    ) -> torch.Tensor:
        """Logits ``(B, T, V)`` predicting the token at every slot of a left-padded batch.

        Args:
            input_ids: ``(B, T)`` tokens.
            positions: ``(B, T)`` absolute positions for RoPE; default ``arange(T)``.
            attention_mask: ``(B, T)`` bool, False for left padding that no one may attend to.
        """
        b, t = input_ids.shape
        device = input_ids.device
        if positions is None:
            positions = torch.arange(t, device=device).expand(b, t)
        # Whole-sequence path (training, scoring): a given mask costs one check per call, which keeps
        # unpadded batches on the mask-free fused kernels; None (no padding, known on the host) costs
        # none. The decode path (forward_windows) never asks the device.
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        key_mask = None if attention_mask is None else attention_mask[:, None, None, :]
        cos, sin = rotary_tables(positions, self.config.head_dim, self.config.rope_theta)
        rope = (cos[:, None], sin[:, None])
        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x, rope, key_mask)
        h = self.norm(x)
        if self.config.shift_logits:
            # Slot i is predicted from slot i-1; a row's first real slot (nothing real before
            # it, as after left padding) keeps its own output, Dream's convention for slot 0.
            real = attention_mask if attention_mask is not None else torch.ones(b, t, dtype=torch.bool, device=device)
            prev_real = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=device), real[:, :-1]], 1)
            shifted = torch.cat([h[:, :1], h[:, :-1]], dim=1)
            h = torch.where(prev_real[..., None], shifted, h)
        return self.head(h)

    def forward_windows(self, w: Windows, cache: KVCache) -> torch.Tensor:
        """Logits ``(NL, V)`` at ``w.head_slots`` after recomputing every window slot of ``w`` in place.

        Shifted-logit models (Dream) read slot ``s``'s prediction from the final hidden state of
        slot ``s - 1``, taken from this forward where that slot is in the window and from the
        cache otherwise (slot 0 keeps its own output, as in :meth:`forward`).
        """
        cos, sin = rotary_tables(w.slots, self.config.head_dim, self.config.rope_theta)
        rope = (cos[:, None], sin[:, None])
        x = self.embed(w.ids)
        key_bias = attention_bias(w.key_mask, x.dtype)
        for i, block in enumerate(self.layers):
            x = block.forward_windows(x, rope, w, cache, i, key_bias)
        h = self.norm(x)
        if self.config.shift_logits:
            hidden = cache.hidden.view(-1, h.shape[-1])
            hidden.index_copy_(0, w.cache_index, h)
            h = hidden.index_select(0, w.head_prev)  # slot 0 keeps its own output
        else:
            h = h.index_select(0, w.head_index)
        return self.head(h)
