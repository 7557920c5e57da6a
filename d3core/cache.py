"""Slot KV cache and the window protocol between the decode engine and the model.

The cache holds, for every cache row and every slot of that row's sequence, the last (post-RoPE)
keys and values a forward computed there (and, for shifted-logit models, the final hidden
state). A forward names a *window* of slots per row; it recomputes K/V for exactly those slots,
writes them in place, and its queries attend to every slot ``[0, key_len)`` of their row. Slots
outside the window are read as cached. Nothing else is implied:

* **prefix cache** (d3LLM, Fast-dLLM ``prefix``): the window is ``[cached_len, length)``;
* **dual cache** (Fast-dLLM ``dual``): the window is the current block ``[lo, hi)`` and the
  still-masked suffix after it is read from the block's first (full) forward;
* **no cache / refresh**: the window is the whole row ``[0, length)``.

Which slots are "authoritative" is the sampler's business, kept as host-side integers. The
model never asks the cache a question, so a forward makes no device-to-host synchronisation:
every shape and index comes from :class:`Windows`, built on the host by the engine.

For a bidirectional model reading cached slots is an approximation whenever their K/V were
computed before later tokens were decoded (Fast-dLLM, d3LLM); it is exact when the cached
slots were computed by a forward that saw the same tokens everywhere.

Memory layout: per layer ``keys/values`` are ``(rows + 1, capacity, kv_heads, head_dim)``
slices of one tensor, so a window scatter writes whole ``(kv_heads, head_dim)`` rows and
attention reads ``keys[:n, :S]`` as a strided view (no copy). The extra last row is scratch
for the padding tokens of bucketed (CUDA-graph) steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Windows:
    """One forward's device-side index tensors (all long unless noted), built by the engine.

    ``N`` window tokens in row-major order, ``n`` cache rows ``[0, n)``, each row's queries padded
    to ``T``, keys spanning ``S`` slots, ``NL`` slots whose logits are wanted.
    """

    ids: torch.Tensor  # (N,) token ids of the window slots
    rows: torch.Tensor  # (N,) cache row of each window token
    slots: torch.Tensor  # (N,) slot (= RoPE position) of each window token
    q_index: torch.Tensor  # (n, T) flat index of row r's t-th query (padding repeats a valid index)
    q_flat: torch.Tensor  # (N,) position r * T + t of each window token in the padded query layout
    key_mask: torch.Tensor | None  # (n, 1, 1, S) bool, True where a key slot is real; None: all real
    head_rows: torch.Tensor  # (NL,) cache row of each logit slot
    head_slots: torch.Tensor  # (NL,) slot whose prediction is wanted
    head_index: torch.Tensor  # (NL,) flat window index of each logit slot (unshifted models)
    cache_index: torch.Tensor  # (N,) row * capacity + slot: where each window token's K/V go
    head_prev: torch.Tensor  # (NL,) row * capacity + max(slot - 1, 0): shifted models read that hidden state
    n: int
    T: int
    S: int
    aligned: bool = False  # every window has ``T`` slots (``N == n * T``): ``q_index`` / ``q_flat`` are the identity
    # Aligned, and every row recomputes slots ``[0, T)`` with ``S == T``: attention reads this forward's own
    # K/V. A row shorter than ``T`` is padded: ``key_mask`` hides its extra slots, whose outputs nobody reads.
    dense: bool = False
    store: bool = True  # write the window's K/V into the cache (False: no later step reads them)


class KVCache:
    """Preallocated per-row slot cache: K/V for every layer, plus hidden states when shifted."""

    def __init__(
        self,
        num_layers: int,
        rows: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        hidden_size: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if rows <= 0:
            raise ValueError(f"KVCache rows={rows}: must be positive (the most sequences decoded at once)")
        if capacity <= 0:
            raise ValueError(f"KVCache capacity={capacity}: must be positive (the longest prompt + generation)")
        shape = (num_layers, rows + 1, capacity, num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.hidden = (torch.zeros(rows + 1, capacity, hidden_size, dtype=dtype, device=device)
                       if hidden_size is not None else None)
        self.rows = rows
        self.capacity = capacity
        logger.debug("KVCache %s x %s slots, %.1f MiB", rows, capacity,
                     (self.keys.numel() + self.values.numel()) * self.keys.element_size() / 2**20)

    @classmethod
    def for_model(cls, model: torch.nn.Module, rows: int, capacity: int) -> "KVCache":
        cfg = model.config
        param = next(model.parameters())
        return cls(cfg.num_layers, rows, cfg.num_kv_heads, cfg.head_dim, capacity,
                   cfg.hidden_size if cfg.shift_logits else None, dtype=param.dtype, device=param.device)

    @property
    def scratch_row(self) -> int:
        """The cache row that padding tokens of a bucketed step write to."""
        return self.rows

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[i], self.values[i]

    def write(self, i: int, index: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """K/V of window tokens into layer ``i`` at flat ``row * capacity + slot`` positions, in place."""
        shape = (-1,) + tuple(self.keys.shape[3:])
        self.keys[i].view(shape).index_copy_(0, index, keys)
        self.values[i].view(shape).index_copy_(0, index, values)

    def move_row(self, src: int, dst: int) -> None:
        """Copy row ``src`` over row ``dst`` (compaction when a sequence leaves): one copy per buffer."""
        if src == dst:
            return
        self.keys[:, dst].copy_(self.keys[:, src])
        self.values[:, dst].copy_(self.values[:, src])
        if self.hidden is not None:
            self.hidden[dst].copy_(self.hidden[src])
