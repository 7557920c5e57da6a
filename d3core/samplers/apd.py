"""``apd``: adaptive parallel decoding (Israel et al., 2025) with a small AR verifier.

Strictly left to right: each iteration the dLLM drafts the next masked positions
``[curr, curr + M)`` in one forward; the AR model (same tokenizer) scores the draft in one
cached forward; the longest prefix on which the draft agrees with the product-of-experts
mixture ``p_dLLM^R * p_AR^(1-R)`` is accepted (its first token always). Knobs:

* ``mixture_weight`` R: the dLLM's weight (higher accepts more);
* ``kv_window`` W: with a dLLM KV cache, slots older than ``curr - W - accepted + 1`` are read
  from the cache and the rest recomputed (None: no dLLM cache);
* ``max_lookahead`` M: how many masked positions the dLLM sees and drafts (None: all);
* ``coupling``: ``argmax`` accepts while the draft equals the mixture's argmax (what the
  reference code ships); ``shared_gumbel`` samples the mixture target with the draft's own
  Gumbel noise (the evident intent). They coincide at temperature 0.

NFE counts dLLM forwards; verifier forwards are reported in ``stats["verifier_forwards"]``.
The dLLM side runs on the engine's per-row windows (each row keeps its own ``curr`` and cache
length). The verifier is a Hugging Face causal LM with one ``DynamicCache`` for the batch, so
an APD batch runs in lockstep: rows are fixed at the start, finished rows sit out the dLLM
forward, and the verifier's cache is cropped to the shortest accepted prefix, which is exact
because causal keys depend only on the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from d3core.samplers.base import DecodeParams, GenerationResult, check_probability
from d3core.samplers.engine import Decoder, Program, Row
from d3core.samplers.generation import OnStep, run
from d3core.samplers.logits import cell_keys, choose, gumbel_noise
from d3core.samplers.plan import RowPlan

COUPLINGS = ("argmax", "shared_gumbel")


@dataclass(frozen=True)
class APDParams(DecodeParams):
    mixture_weight: float = 0.7
    kv_window: int | None = 16
    max_lookahead: int | None = None
    coupling: str = "argmax"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_probability("mixture_weight", self.mixture_weight)
        if self.kv_window is not None and self.kv_window < 0:
            raise ValueError(f"kv_window={self.kv_window}: must be >= 0, or None for no dLLM cache")
        if self.max_lookahead is not None and self.max_lookahead < 1:
            raise ValueError(f"max_lookahead={self.max_lookahead}: must be >= 1, or None for all masked positions")
        if self.coupling not in COUPLINGS:
            raise ValueError(f"coupling={self.coupling!r}: must be one of {COUPLINGS}")


@dataclass
class _State:
    curr: int  # first undecided slot
    accepted: int = 0  # tokens accepted by the last iteration
    cache_len: int = 0  # dLLM slots [0, cache_len) cached
    right: int = 0  # this iteration's draft end
    done: bool = False


class APDProgram(Program):
    """APD on the engine: per-row dLLM windows, one batched verifier forward per step."""

    name = "apd"
    reusable = False  # the verifier's cache and the batch's width belong to one decode
    joins_mid_run = False  # one verifier cache for the batch: rows are fixed at the first step

    def __init__(self, params: APDParams, verifier: torch.nn.Module) -> None:
        self.params, self.verifier = params, verifier
        self.v_cache = None
        self.width: int | None = None  # the verifier's left-padded prompt width, fixed at the first step
        self.verifier_forwards = 0

    def segment_length(self, params) -> int:
        return 1

    def init_row(self, row: Row, d: Decoder) -> None:
        if self.width is not None:
            raise ValueError("apd decodes a fixed batch in lockstep (one verifier cache): rows cannot join mid-run")
        row.state = _State(curr=row.prompt_len)

    def plan_all(self, d: Decoder) -> list[RowPlan | None]:
        if self.width is None:
            self.width = max(row.prompt_len for row in d.rows)
        if all(row.state.done for row in d.rows):
            return [None] * len(d.rows)
        p, plans = self.params, []
        for row in d.rows:
            st = row.state
            if st.done:
                plans.append(RowPlan(0, 0, 1))  # sits out, keeps its verifier row
                continue
            st.right = min(st.curr + (p.max_lookahead or row.length), row.length)
            start = 0
            if p.kv_window is not None and st.cache_len > 0:
                pad = self.width - row.prompt_len  # the old left-padded truncation point, in row slots
                start = min(st.cache_len, max(max(st.curr + pad - p.kv_window - st.accepted + 1, 0) - pad, 0))
            plans.append(RowPlan(start, st.right, st.right, temperature=p.temperature))
        return plans

    def run_step(self, d: Decoder, rows: list[Row], plans: list[RowPlan], steps: list[int]) -> list[np.ndarray]:
        width = self.width
        active = [i for i, plan in enumerate(plans) if not plan.sits_out]
        pads = np.array([width - row.prompt_len for row in rows], dtype=np.int64)
        curr = np.array([rows[i].state.curr for i in active], dtype=np.int64)
        right = np.array([rows[i].state.right for i in active], dtype=np.int64)
        cell_rows = np.repeat(np.array(active, dtype=np.int64), right - curr)
        first = np.concatenate([[0], np.cumsum(right - curr)])
        cell_slots = curr.repeat(right - curr) + (np.arange(first[-1]) - first[:-1].repeat(right - curr))
        lo, hi = int((curr + pads[active]).min()), int((right + pads[active]).max())  # left-padded coordinates
        c0 = 0 if self.v_cache is None else lo - 1
        lp_slots = np.arange(c0, hi, dtype=np.int64)
        row_slots = lp_slots[None] - pads[:, None]  # (B, hi - c0) row slot of each left-padded slot
        real = row_slots >= 0
        base_ids = np.where(real, d.tokens[np.arange(len(rows))[:, None], np.maximum(row_slots, 0)], d.pad_id)
        # With no left padding the verifier's mask is purely causal: pass none, so that transformers does
        # not read an all-ones mask back from the device to find that out.
        attn = (np.arange(hi)[None] >= pads[:, None]).astype(np.int64) if pads.any() else None
        longest = int((right - curr).max())
        run_index = np.minimum(first[:-1, None] + np.arange(longest)[None], len(cell_rows) - 1)
        run_valid = np.arange(longest)[None] < (right - curr)[:, None]
        extra = {"v_ids": base_ids, "v_pos": np.maximum(row_slots, 0),
                 "run_index": run_index, "run_valid": run_valid,
                 "v_col": cell_slots + pads[cell_rows] - c0, "cell_rows": cell_rows,
                 "seeds": np.array([rows[i].seed for i in cell_rows], dtype=np.int64),
                 "steps": np.array([steps[i] for i in cell_rows], dtype=np.int64)}
        if attn is not None:
            extra["v_attn"] = attn
        w, dev = d.packer.windows(d.tokens, plans, cell_rows, cell_slots, extra)
        out = self._device(d, w, dev, len(rows), hi - c0, c0, (len(active), longest))
        self.verifier_forwards += 1
        decided = d.fetch(out)
        draft, n_acc = decided[0, : len(cell_rows)], decided[1, : len(active)]
        committed = [np.zeros(0, dtype=np.int64) for _ in rows]
        for j, i in enumerate(active):
            committed[i] = self._accept(d, rows[i], draft[first[j]: first[j] + n_acc[j]], int(n_acc[j]))
        return committed

    @torch.no_grad()
    def _device(self, d: Decoder, w, dev, batch: int, span: int, c0: int, runs: tuple[int, int]) -> torch.Tensor:
        p = self.params
        vocab = min(d.model.config.vocab_size, self.verifier.config.vocab_size)
        logits = d.model.forward_windows(w, d.cache)[:, :vocab].double()
        noise = None
        if p.temperature > 0:
            keys = cell_keys(dev["seeds"], dev["steps"], w.head_slots)
            noise = gumbel_noise(keys, vocab)
            draft = choose(logits / p.temperature + noise, d.mask_id)
        else:
            draft = choose(logits, d.mask_id)
        ids = dev["v_ids"].view(batch, span).clone()
        ids[dev["cell_rows"], dev["v_col"]] = draft
        if self.v_cache is not None and self.v_cache.get_seq_length() > c0:
            self.v_cache.crop(c0 - self.v_cache.get_seq_length())  # keep only the accepted prefix [0, c0)
        attn = dev["v_attn"].view(batch, -1) if "v_attn" in dev else None
        v_out = self.verifier(input_ids=ids, attention_mask=attn,
                              position_ids=dev["v_pos"].view(batch, span), past_key_values=self.v_cache,
                              use_cache=True)
        self.v_cache = v_out.past_key_values
        v = v_out.logits[dev["cell_rows"], dev["v_col"] - 1, :vocab].double()  # predicts each cell's slot
        mix = p.mixture_weight * torch.log_softmax(logits, -1) + (1 - p.mixture_weight) * torch.log_softmax(v, -1)
        if p.coupling == "shared_gumbel" and noise is not None:
            mix = mix / p.temperature + noise
        agree = draft == mix.argmax(-1)
        # Per active row, the run of agreeing cells from its first (always accepted) cell.
        n_act, longest = runs
        padded = agree[dev["run_index"].view(n_act, longest)] & dev["run_valid"].view(n_act, longest).bool()
        padded[:, 0] = True
        n_acc = padded.long().cumprod(-1).sum(-1)
        out = torch.zeros(2, max(len(draft), n_act), dtype=torch.long, device=agree.device)
        out[0, : len(draft)] = draft
        out[1, :n_act] = n_acc
        return out

    def _accept(self, d: Decoder, row: Row, tokens: np.ndarray, n_acc: int) -> np.ndarray:
        st = row.state
        r = row.cache_row
        slots = np.arange(st.curr, st.curr + n_acc)
        d.tokens[r, slots] = tokens
        d.unmask[r, slots] = row.nfe - 1
        st.curr += n_acc
        st.accepted = n_acc
        st.cache_len = st.right
        if np.isin(tokens, d.eos_ids).any():
            d.fill_eos(row, st.curr - row.prompt_len, row.nfe - 1, overwrite=True)
            st.done = True
        st.done |= st.curr >= row.length
        return slots


def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    params: APDParams = APDParams(),
    generator: torch.Generator | None = None,
    on_step: OnStep | None = None,
    verifier: torch.nn.Module | None = None,
) -> GenerationResult:
    if verifier is None:
        raise ValueError("apd needs verifier=<a small AR model with the same tokenizer>, e.g. the tiny AR baseline")
    program = APDProgram(params, verifier)
    result = run(program, model, prompts, params, generator, on_step, verifier)
    result.stats["verifier_forwards"] = program.verifier_forwards
    return result
