"""Step packing: a step that reuses the previous step's arrays (same geometry) equals a fresh build."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from d3core.samplers.packing import build_segment_step
from d3core.samplers.plan import DYNAMIC_PARTS, RowPlan

MASK, PAD, CAP, SEG = 5, 0, 40, 8


def _tokens(rng: np.random.Generator, rows: int) -> np.ndarray:
    tokens = rng.integers(6, 50, size=(rows, CAP))
    tokens[rng.random(tokens.shape) < 0.5] = MASK
    return tokens


GEOMETRIES = {
    # dense: every row recomputes all of its slots
    "dense": [RowPlan(0, 32, 32, [8], params={"k": 2, "t": 0.5}), RowPlan(0, 32, 32, [16], params={"k": 1, "t": 0.9})],
    # aligned windows over cached keys (dual cache)
    "aligned": [RowPlan(8, 16, 32, [8], params={"k": 1}), RowPlan(16, 24, 40, [16], params={"k": 3})],
    # ragged windows, padded segments, one row sitting out, sampling
    "ragged": [RowPlan(4, 30, 30, [8, 16], flags=[1, 0], params={"k": 2}, temperature=0.7),
               RowPlan(0, 0, 1), RowPlan(10, 20, 36, [12], flags=[1], params={"k": 4})],
}


def _build(tokens, plans, steps, buckets, previous=None):
    return build_segment_step(tokens, plans, SEG, MASK, [11, 12, 13][: len(plans)], steps, True, CAP, buckets,
                              previous=previous)


def _with_ints(plans: list[RowPlan], bump: int) -> list[RowPlan]:
    return [RowPlan(p.start, p.end, p.keys, p.segments, p.flags,
                    {k: v + bump if isinstance(v, int) else v / 2 for k, v in p.params.items()}, p.temperature)
            for p in plans]


@pytest.mark.parametrize("bucketed", [False, True], ids=["eager", "bucketed"])
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_a_refilled_step_equals_a_fresh_build(name, bucketed):
    rng = np.random.default_rng(0)
    plans = GEOMETRIES[name]
    buckets = ({"rows": 4, "capacity": CAP, "scratch_row": 4, "pad_id": PAD, "max_segments": 2}
               if bucketed else None)
    first = _build(_tokens(rng, 3), plans, [0, 1, 2][: len(plans)], buckets)
    tokens, later = _tokens(rng, 3), _with_ints(plans, 1)
    steps = [5, 7, 9][: len(plans)]
    refilled = _build(tokens, later, steps, buckets, previous=first)
    fresh = _build(tokens, later, steps, buckets)
    assert refilled.parts is first.parts  # the arrays were rewritten in place, not rebuilt
    assert refilled.shape == fresh.shape  # the host min / max follow the new rule parameters
    assert list(refilled.parts) == list(fresh.parts)
    for key in fresh.parts:
        np.testing.assert_array_equal(refilled.parts[key], fresh.parts[key], err_msg=key)
    changed = [k for k in DYNAMIC_PARTS if k in fresh.parts]
    assert any(not np.array_equal(np.asarray(_build(_tokens(rng, 3), plans, [0, 1, 2][: len(plans)], buckets)
                                             .parts[k]), fresh.parts[k]) for k in changed)


def test_another_geometry_is_built_afresh():
    rng = np.random.default_rng(1)
    plans = GEOMETRIES["aligned"]
    first = _build(_tokens(rng, 2), plans, [0, 0], None)
    moved = [RowPlan(16, 24, 32, [16], params={"k": 1}), plans[1]]  # row 0's block advanced
    tokens = _tokens(rng, 2)
    step = _build(tokens, moved, [1, 1], None, previous=first)
    assert step.parts is not first.parts
    for key, value in _build(tokens, moved, [1, 1], None).parts.items():
        np.testing.assert_array_equal(step.parts[key], value, err_msg=key)


@pytest.mark.parametrize("name", ["fast_dllm", "dparallel"])  # dparallel's rule has no int parameters
def test_the_decoder_reuses_its_step_views_on_the_cpu_and_stays_exact(name):
    """Decoding with step reuse gives the tokens of decoding with every step built afresh."""
    from d3core.eval import synthetic
    from d3core.models.shipped import load_tiny_teacher, load_tiny_tokenizer
    from d3core.samplers import engine
    from d3core.samplers.dparallel import DParallelParams, DParallelProgram
    from d3core.samplers.fast_dllm import FastDLLMParams, FastDLLMProgram
    from d3core.sft import encode_prompt

    model, tok = load_tiny_teacher(), load_tiny_tokenizer()
    prompts = [encode_prompt(tok, p.question) for p in synthetic.generate("test", 2, seed=0)]
    if name == "fast_dllm":
        program, params = FastDLLMProgram(), FastDLLMParams(gen_length=32, block_length=8, threshold=0.9, cache="dual")
    else:
        program, params = DParallelProgram(), DParallelParams(gen_length=32, block_length=8, threshold=0.5)

    def decode(reuse: bool) -> tuple[list[list[int]], int]:
        d = engine.Decoder(model, program, 2, max(map(len, prompts)) + 32)
        rows = [d.add(p, params, seed=i) for i, p in enumerate(prompts)]
        reused = 0
        while d.rows:
            if not reuse:
                d._last_step = None
            before = d._eager
            d.step()
            reused += d._eager is not None and d._eager is before
        return [r.result.tokens for r in rows], reused

    with torch.no_grad():
        fresh, none_reused = decode(False)
        tokens, reused = decode(True)
    assert none_reused == 0 and reused > 0
    assert tokens == fresh


def test_whole_rows_of_different_lengths_run_dense_padded_to_the_longest():
    """Rows that each recompute their whole sequence run as one dense step (no gathers, no cache write),
    their shorter rows' extra keys masked; rows too unequal for that keep the gathered layout."""
    rng = np.random.default_rng(2)
    tokens = _tokens(rng, 3)
    plans = [RowPlan(0, 36, 36, [24]), RowPlan(0, 30, 30, [16]), RowPlan(0, 40, 40, [32])]
    step = build_segment_step(tokens, plans, SEG, MASK, [1, 2, 3], [0, 0, 0], False, CAP, store=False)
    assert (step.shape.dense, step.shape.aligned, step.shape.masked_keys, step.shape.store) == (True, True, True, False)
    assert (step.shape.T, step.shape.S, step.shape.tokens) == (40, 40, 120)
    np.testing.assert_array_equal(step.parts["ids"], tokens[:3, :40].reshape(-1))
    np.testing.assert_array_equal(step.parts["key_len"], [36, 30, 40])
    np.testing.assert_array_equal(step.parts["head_index"], np.repeat([0, 40, 80], SEG) + step.layout.cell_slots)
    unequal = [RowPlan(0, 40, 40, [32]), RowPlan(0, 12, 12, [0])]  # 80 padded slots for 52 real: gathered
    gathered = build_segment_step(tokens, unequal, SEG, MASK, [1, 2], [0, 0], False, CAP, store=False)
    assert (gathered.shape.dense, gathered.shape.aligned, gathered.shape.tokens) == (False, False, 52)
    assert gathered.shape.store  # a gathered attention reads the window's keys back from the cache


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_a_padded_dense_step_gives_the_logits_of_the_gathered_step(arch, monkeypatch):
    """The same whole-row windows through the padded dense layout and through the gathered one."""
    from d3core.cache import KVCache
    from d3core.models.registry import build_model
    from d3core.samplers import packing
    from d3core.samplers.packing import Packer

    model = build_model(arch, "tiny", seed=0, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                        num_kv_heads=4 if arch == "llada" else 2).eval()
    lengths = [17, 20, 15]
    tokens = np.random.default_rng(3).integers(0, model.config.vocab_size, size=(3, 20))
    plans = [RowPlan(0, n, n) for n in lengths]
    rows = np.repeat(np.arange(3), lengths).astype(np.int64)
    slots = np.concatenate([np.arange(n) for n in lengths]).astype(np.int64)

    def logits() -> tuple[torch.Tensor, bool]:
        w, _ = Packer(torch.device("cpu"), 20).windows(tokens, plans, rows, slots)
        with torch.no_grad():
            return model.forward_windows(w, KVCache.for_model(model, 3, 20)), w.dense

    padded, dense = logits()
    monkeypatch.setattr(packing, "WHOLE_ROW_PADDING", -1.0)  # never pad: the gathered layout
    gathered, still_dense = logits()
    assert dense and not still_dense
    torch.testing.assert_close(padded, gathered, rtol=1e-6, atol=1e-6)


def test_row_parameters_travel_by_name_with_host_summaries():
    from d3core.samplers.packing import Packer, segment_meta

    tokens = np.full((3, 64), 7, dtype=np.int64)
    plans = [RowPlan(0, 32, 32, [8], params={"llada": True, "k": 3, "threshold": 0.25}),
             RowPlan(0, 32, 32, [16], params={"llada": False, "k": 5, "threshold": 0.75})]
    step = build_segment_step(tokens, plans, 8, 1, [0, 0], [0, 0], False, 64,
                              {"rows": 3, "capacity": 64, "scratch_row": 2, "pad_id": 0, "max_segments": 4})
    assert step.shape.n == 3 and step.shape.int_names == ("llada", "k") and step.shape.float_names == ("threshold",)
    row = segment_meta(Packer(torch.device("cpu"), 64).upload(step.parts), step.shape, torch.device("cpu")).row
    assert row["threshold"][:2].tolist() == [0.25, 0.75] and row["k"][:2].tolist() == [3, 5]
    assert row["k"][2:].tolist() == [0]  # a padding row carries zeros and is left out of the summaries
    assert (row.max("k"), row.min("k"), row.any("llada"), row.all("llada")) == (5, 3, True, False)
    with pytest.raises(KeyError, match="no per-row parameter 'temperature'"):
        row["temperature"]
    with pytest.raises(ValueError, match="differ from the step's"):
        build_segment_step(tokens, [plans[0], RowPlan(0, 32, 32, [16], params={"k": 1})], 8, 1, [0, 0], [0, 0],
                           False, 64)
