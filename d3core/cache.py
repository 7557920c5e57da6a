"""Block-wise KV cache for bidirectional dLLMs.

The cache holds, per layer, the (post-RoPE) keys and values of each row's authoritative
prefix of slots ``[0, row_length[r])`` of a left-padded batch, the key-padding mask of those
slots, and the final hidden state of each cached slot (Dream-style models read their
prediction for slot ``i`` at slot ``i - 1``).

A forward runs on a *window* of slots starting at ``length = min(row_length)``. Rows whose
own prefix reaches further into the window take their cached K/V (and hidden state) for
those slots instead of the fresh ones, so every row sees exactly what it would see decoded
alone, however far the other rows have got. A forward may *commit* slots, which makes
their K/V (computed by that very forward) part of the row's prefix: there is exactly one
cache length per row, never two copies of a position.

A forward may also start *inside* the cached range (Fast-dLLM's dual cache): its tokens
then stand in for slots ``[start, start + T)`` for that forward only, attending to the cached
prefix before and the cached suffix after them.

For a bidirectional model this is an approximation whenever the cached keys were computed
before later tokens were decoded (Fast-dLLM, d3LLM); it is exact when the prefix was
computed by a forward that saw the same tokens everywhere (see the cache-exactness tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerKV:
    keys: torch.Tensor  # (B, H_kv, capacity, D)
    values: torch.Tensor  # (B, H_kv, capacity, D)


class KVCache:
    """Preallocated per-row prefix cache."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        hidden_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if capacity <= 0:
            raise ValueError(f"KVCache capacity={capacity}: must be positive (the longest sequence)")
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.layers = [
            LayerKV(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]
        self.key_mask = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        self.hidden = torch.zeros(batch_size, capacity, hidden_size, dtype=dtype, device=device)
        self.row_length = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.capacity = capacity
        self._window: torch.Tensor | None = None  # (B, 1, T, 1) True where a row reuses its cached slot

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, capacity: int) -> "KVCache":
        cfg = model.config
        param = next(model.parameters())
        return cls(
            cfg.num_layers, batch_size, cfg.num_kv_heads, cfg.head_dim, capacity, cfg.hidden_size,
            dtype=param.dtype, device=param.device,
        )

    @property
    def batch_size(self) -> int:
        return self.key_mask.shape[0]

    @property
    def length(self) -> int:
        """Where a prefix-mode window starts: the shortest row prefix."""
        return int(self.row_length.min()) if self.batch_size else 0

    @property
    def uniform(self) -> bool:
        return bool((self.row_length == self.row_length[0]).all())

    # -- window bookkeeping (called by the model forward) ---------------------------------
    def begin_window(self, width: int) -> None:
        """Prepare a prefix-mode forward over slots ``[length, length + width)``."""
        if self.length + width > self.capacity:
            raise ValueError(
                f"KVCache overflow: window [{self.length}, {self.length + width}) exceeds capacity "
                f"{self.capacity}; build the cache with capacity >= prompt + generation length"
            )
        slots = torch.arange(self.length, self.length + width, device=self.row_length.device)
        reuse = slots[None, :] < self.row_length[:, None]
        self._window = reuse[:, None, :, None] if bool(reuse.any()) else None

    def prefix_and_window(self, layer: int, keys: torch.Tensor, values: torch.Tensor, store: bool):
        """Keys/values to attend to: cached ``[0, length)`` + the window (rows reuse cached slots)."""
        kv = self.layers[layer]
        start, width = self.length, keys.shape[2]
        if self._window is not None:
            keys = torch.where(self._window, kv.keys[:, :, start: start + width], keys)
            values = torch.where(self._window, kv.values[:, :, start: start + width], values)
        if store:
            kv.keys[:, :, start: start + width] = keys
            kv.values[:, :, start: start + width] = values
        return torch.cat([kv.keys[:, :, :start], keys], 2), torch.cat([kv.values[:, :, :start], values], 2)

    def window_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._window is None:
            return hidden
        start = self.length
        return torch.where(self._window[:, 0], self.hidden[:, start: start + hidden.shape[1]], hidden)

    def end_window(self, hidden: torch.Tensor, key_mask: torch.Tensor, targets: torch.Tensor | None) -> None:
        """Commit: rows' prefixes grow to ``targets`` (absolute slot counts) with this window's K/V."""
        if targets is not None:
            start, width = self.length, hidden.shape[1]
            self.hidden[:, start: start + width] = hidden
            self.key_mask[:, start: start + width] = key_mask
            if bool((targets > start + width).any()):
                raise ValueError(f"commit target {int(targets.max())} lies beyond the window end {start + width}")
            self.row_length = torch.maximum(self.row_length, targets)
        self._window = None

    # -- dual-cache reads -------------------------------------------------------------------
    def around(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor):
        """Cached K/V before ``start`` and after ``start + T`` around a replacing window."""
        kv = self.layers[layer]
        end, stop = start + keys.shape[2], self.length
        return (torch.cat([kv.keys[:, :, :start], keys, kv.keys[:, :, end:stop]], 2),
                torch.cat([kv.values[:, :, :start], values, kv.values[:, :, end:stop]], 2))

    def mask_around(self, start: int, new_mask: torch.Tensor) -> torch.Tensor:
        end = start + new_mask.shape[1]
        return torch.cat([self.key_mask[:, :start], new_mask, self.key_mask[:, end: self.length]], dim=1)

    def hidden_before(self, slot: int) -> torch.Tensor:
        """Final hidden state cached for slot ``slot - 1``."""
        return self.hidden[:, slot - 1]

    # -- management -------------------------------------------------------------------------
    def truncate(self, length: int | torch.Tensor) -> None:
        """Shorten row prefixes to at most ``length`` (an int, or one per row), e.g. before a refresh."""
        if isinstance(length, int) and length < 0:
            raise ValueError(f"KVCache.truncate({length}): the length must be >= 0")
        self.row_length = torch.minimum(self.row_length, torch.as_tensor(length, device=self.row_length.device))

    def select(self, rows: torch.Tensor) -> "KVCache":
        """A new cache with only the given batch rows (for dropping finished sequences)."""
        out = KVCache.__new__(KVCache)
        out.layers = [LayerKV(kv.keys[rows], kv.values[rows]) for kv in self.layers]
        out.key_mask = self.key_mask[rows]
        out.hidden = self.hidden[rows]
        out.row_length = self.row_length[rows]
        out.capacity = self.capacity
        out._window = None
        return out
