"""The slot KV cache and the packed-window forward against the whole-sequence forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from host_reads import HostReads

from d3core.cache import KVCache
from d3core.models.registry import build_model, preset
from d3core.samplers.base import make_batch
from d3core.samplers.packing import Packer
from d3core.samplers.plan import RowPlan

SMALL = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
ATOL = dict(rtol=1e-5, atol=1e-5)


def model_for(arch):
    return build_model(arch, "tiny", seed=0, num_kv_heads=4 if arch == "llada" else 2, **SMALL).eval()


def window_logits(model, cache, tokens: np.ndarray, windows: list[tuple[int, int, int]],
                  heads: list[list[int]]) -> list[torch.Tensor]:
    """One packed forward: row r recomputes [start, end), attends to [0, keys), logits at heads[r]."""
    plans = [RowPlan(s, e, k) for s, e, k in windows]
    rows = np.concatenate([[r] * len(h) for r, h in enumerate(heads)]).astype(np.int64)
    slots = np.concatenate([h for h in heads]).astype(np.int64)
    w, _ = Packer(torch.device("cpu"), cache.capacity).windows(tokens, plans, rows, slots)
    with torch.no_grad():
        logits = model.forward_windows(w, cache)
    out, at = [], 0
    for h in heads:
        out.append(logits[at: at + len(h)])
        at += len(h)
    return out


def random_tokens(model, rows, length, seed):
    return torch.randint(0, model.config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("prefix", [1, 7, 15])
def test_window_after_the_prefix_reads_the_cache_and_equals_the_full_forward(arch, prefix):
    model = model_for(arch)
    ids = random_tokens(model, 3, 20, 0)
    with torch.no_grad():
        full = model(ids)
    cache = KVCache.for_model(model, 3, 20)
    tokens = ids.numpy()
    everything = window_logits(model, cache, tokens, [(0, 20, 20)] * 3, [list(range(20))] * 3)
    suffix = window_logits(model, cache, tokens, [(prefix, 20, 20)] * 3, [list(range(prefix, 20))] * 3)
    for r in range(3):
        torch.testing.assert_close(everything[r], full[r], **ATOL)
        torch.testing.assert_close(suffix[r], full[r, prefix:], **ATOL)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_rows_of_different_lengths_in_one_forward_equal_each_row_alone(arch):
    model = model_for(arch)
    prompts = [[3, 9, 11, 20, 21], [40, 41], [7, 8, 9, 10, 11, 12, 13]]
    lengths = [len(p) + 6 for p in prompts]
    tokens = np.full((3, max(lengths)), model.config.mask_id, dtype=np.int64)
    for r, p in enumerate(prompts):
        tokens[r, : len(p)] = p
    cache = KVCache.for_model(model, 3, max(lengths))
    together = window_logits(model, cache, tokens, [(0, n, n) for n in lengths], [list(range(n)) for n in lengths])
    for r, p in enumerate(prompts):
        alone = make_batch([p], 6, model.config.mask_id, model.config.pad_id)
        with torch.no_grad():
            ref = model(alone.x, alone.positions, alone.attention_mask)[0]
        torch.testing.assert_close(together[r], ref, **ATOL)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_left_padded_whole_sequence_rows_equal_rows_alone(arch):
    model = model_for(arch)
    prompts = [[3, 9, 11, 20, 21], [40, 41], [7, 8, 9, 10, 11, 12, 13]]
    batch = make_batch(prompts, 4, model.config.mask_id, model.config.pad_id)
    with torch.no_grad():
        together = model(batch.x, batch.positions, batch.attention_mask)
        for i, p in enumerate(prompts):
            alone = make_batch([p], 4, model.config.mask_id, model.config.pad_id)
            logits = model(alone.x, alone.positions, alone.attention_mask)
            torch.testing.assert_close(together[i, -logits.shape[1]:], logits[0], **ATOL)


def test_dream_logits_are_shifted_by_one_slot():
    import dataclasses

    dream = model_for("dream")
    unshifted = build_model(dataclasses.replace(dream.config, shift_logits=False)).eval()
    unshifted.load_state_dict(dream.state_dict())
    ids = random_tokens(dream, 2, 10, 3)
    with torch.no_grad():
        shifted, plain = dream(ids), unshifted(ids)
    assert torch.equal(shifted[:, 1:], plain[:, :-1])
    assert torch.equal(shifted[:, 0], plain[:, 0])


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_dual_window_reads_prefix_and_suffix_from_the_cache(arch):
    model = model_for(arch)
    ids = random_tokens(model, 2, 18, 5)
    with torch.no_grad():
        full = model(ids)
    cache = KVCache.for_model(model, 2, 18)
    tokens = ids.numpy()
    window_logits(model, cache, tokens, [(0, 18, 18)] * 2, [[17]] * 2)
    s, e = 9, 13
    block = window_logits(model, cache, tokens, [(s, e, 18)] * 2, [list(range(s, e))] * 2)
    for r in range(2):
        torch.testing.assert_close(block[r], full[r, s:e], **ATOL)


def test_a_stale_cache_is_an_approximation_and_a_full_window_refreshes_it():
    model = model_for("llada")
    ids = random_tokens(model, 1, 16, 4)
    changed = ids.clone()
    changed[:, 2] = (ids[:, 2] + 1) % model.config.vocab_size
    with torch.no_grad():
        fresh = model(changed)
    cache = KVCache.for_model(model, 1, 16)
    window_logits(model, cache, ids.numpy(), [(0, 16, 16)], [[0]])  # K/V of the old tokens
    stale = window_logits(model, cache, changed.numpy(), [(10, 16, 16)], [list(range(10, 16))])[0]
    assert not torch.allclose(stale, fresh[0, 10:], atol=1e-4)
    window_logits(model, cache, changed.numpy(), [(0, 16, 16)], [[0]])  # refresh
    after = window_logits(model, cache, changed.numpy(), [(10, 16, 16)], [list(range(10, 16))])[0]
    torch.testing.assert_close(after, fresh[0, 10:], **ATOL)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_rows_with_different_windows_see_what_they_would_alone(arch):
    """Row 0 reads its cache up to slot 5, row 1 up to slot 9, row 2 refreshes everything: one forward."""
    model = model_for(arch)
    ids = random_tokens(model, 3, 16, 7)
    stale = ids.clone()
    stale[:, 1] = (ids[:, 1] + 3) % model.config.vocab_size  # the cached K/V saw another token here
    cache = KVCache.for_model(model, 3, 16)
    window_logits(model, cache, stale.numpy(), [(0, 16, 16)] * 3, [[0]] * 3)
    starts = (5, 9, 0)
    batched = window_logits(model, cache, ids.numpy(), [(s, 16, 16) for s in starts],
                            [list(range(s, 16)) for s in starts])
    for row, cut in enumerate(starts):
        alone = KVCache.for_model(model, 1, 16)
        window_logits(model, alone, stale[row: row + 1].numpy(), [(0, 16, 16)], [[0]])
        ref = window_logits(model, alone, ids[row: row + 1].numpy(), [(cut, 16, 16)], [list(range(cut, 16))])[0]
        torch.testing.assert_close(batched[row], ref, **ATOL)


def test_moving_a_row_moves_its_whole_cache():
    model = model_for("dream")
    cache = KVCache.for_model(model, 3, 8)
    cache.keys[:, 2].normal_()
    cache.hidden[2].normal_()
    keys, hidden = cache.keys[:, 2].clone(), cache.hidden[2].clone()
    cache.move_row(2, 0)
    assert torch.equal(cache.keys[:, 0], keys) and torch.equal(cache.hidden[0], hidden)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_the_window_forward_never_reads_device_data_on_the_host(arch):
    model = model_for(arch)
    tokens = random_tokens(model, 2, 12, 1).numpy()
    plans = [RowPlan(0, 12, 12), RowPlan(4, 10, 10)]
    cache = KVCache.for_model(model, 2, 12)
    w, _ = Packer(torch.device("cpu"), cache.capacity).windows(tokens, plans, np.array([0, 1]), np.array([11, 6]))
    with torch.no_grad(), HostReads() as spy:
        model.forward_windows(w, cache)
    assert spy.seen == []
    with torch.no_grad(), HostReads() as spy:  # the spy does see syncs
        model(torch.as_tensor(tokens), attention_mask=torch.ones(2, 12, dtype=torch.bool))
    assert "_local_scalar_dense" in spy.seen or "is_nonzero" in spy.seen


def test_config_validation_names_the_value():
    with pytest.raises(ValueError, match="hidden_size=30 is not divisible by num_heads=4"):
        preset("llada", "tiny", hidden_size=30)
    with pytest.raises(ValueError, match="mask_id=999"):
        preset("llada", "tiny", mask_id=999)
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        preset("llada", "huge")
    with pytest.raises(ValueError, match="unknown architecture 'gpt'"):
        preset("gpt", "tiny")
    with pytest.raises(ValueError, match="capacity=0"):
        KVCache(1, 1, 1, 2, 0)
