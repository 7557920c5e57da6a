"""Single-block threshold decoding with an optional approximate KV cache.

The engine program behind ``fast_dllm`` (confidence threshold or factor rule) and
``dparallel`` (entropy threshold): blocks are decoded left to right; within the current block
each step commits every masked position that passes the sampler's rule, and always at least one.

Cache modes (Fast-dLLM), as windows of the slot cache (:mod:`d3core.cache`):
  * ``none``   every step recomputes the whole sequence;
  * ``prefix`` the first step of a block recomputes the whole sequence; later steps recompute
    the block and the masked suffix, reading the prefix from the cache;
  * ``dual``   the first step recomputes everything; later steps recompute the block alone,
    reading the prefix and the (still masked) suffix from the cache.
The first step of a block is a full forward in both cached modes, so its tokens equal the
uncached path's; later steps read K/V computed before the block's newest tokens existed.

With ``early_stop`` a row finishes once it has committed an EOS with nothing masked before
it; every slot still masked then becomes EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from d3core.samplers.base import BlockParams
from d3core.samplers.engine import Decoder, Program, Row
from d3core.samplers.plan import Cells, RowParams, RowPlan

CACHE_MODES = ("none", "prefix", "dual")


@dataclass(frozen=True)
class BlockwiseParams(BlockParams):
    cache: str = "none"
    early_stop: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cache not in CACHE_MODES:
            raise ValueError(f"cache={self.cache!r}: must be one of {CACHE_MODES}")


def with_best(take: torch.Tensor, score: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """``take`` plus, in every row with a masked position, the masked position of highest ``score``.

    ``take`` must lie within ``masked`` and is updated in place (callers pass a fresh tensor)."""
    best = score.masked_fill(~masked, -float("inf")).argmax(-1, keepdim=True)
    return take.scatter_(-1, best, masked.gather(-1, best))  # a row with nothing masked keeps its all-False take


@dataclass
class _State:
    block: int = 0
    first_step: bool = True


class BlockwiseProgram(Program):
    """Host side shared by fast_dllm and dparallel; subclasses give the device ``select``."""

    def init_row(self, row: Row, d: Decoder) -> None:
        row.state = _State()

    def plan(self, row: Row, d: Decoder) -> RowPlan | None:
        st, p = row.state, row.params
        gen, _ = d.gen(row)
        while not (gen[st.block * p.block_length: (st.block + 1) * p.block_length] == d.mask_id).any():
            st.block, st.first_step = st.block + 1, True
            if st.block == p.num_blocks:
                return None
        lo = row.prompt_len + st.block * p.block_length
        if p.cache == "none" or st.first_step:
            start, end = 0, row.length
        else:
            start, end = lo, (row.length if p.cache == "prefix" else lo + p.block_length)
        return RowPlan(start, end, row.length, [lo], params=self.row_params(p), temperature=p.temperature)

    def reads_cache(self, params) -> bool:
        return params.cache != "none"

    def row_params(self, params) -> dict[str, bool | int | float]:
        """The commit rule's per-row parameters by name (:class:`~d3core.samplers.packing.RowParams`)."""
        return {}

    def rule(self, cells: Cells) -> torch.Tensor:
        n, ns, seg = cells.cand.shape  # one segment per row: the current block

        def flat(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.view(n * ns, seg)

        take = self.select(flat(cells.conf), flat(cells.entropy), flat(cells.cand), cells.row)
        return take.view(n, ns, seg)

    def select(self, conf: torch.Tensor, ent: torch.Tensor | None, masked: torch.Tensor,
               row: RowParams) -> torch.Tensor:
        """Device: bool ``(rows, block)`` of the masked positions to commit."""
        raise NotImplementedError

    def after(self, row: Row, d: Decoder, committed: np.ndarray) -> None:
        row.state.first_step = False
        if row.params.early_stop:
            finish_at_eos(row, d)


def finish_at_eos(row: Row, d: Decoder) -> None:
    """A committed EOS with nothing masked before it ends the row; slots still masked become EOS."""
    first = d.first_eos(row)
    gen, _ = d.gen(row)
    if first is None or (gen[:first] == d.mask_id).any():
        return
    d.fill_eos(row, 0, row.nfe - 1, overwrite=False)
    row.finished = True
