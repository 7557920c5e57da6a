"""The block KV cache against the full forward, and left-padded batches against rows alone."""

from __future__ import annotations

import pytest
import torch

from d3core.cache import KVCache
from d3core.models.registry import build_model, preset
from d3core.samplers.base import make_batch

SMALL = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)


def model_for(arch):
    return build_model(arch, "tiny", seed=0, num_kv_heads=4 if arch == "llada" else 2, **SMALL).eval()


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("prefix", [1, 7, 15])
def test_suffix_with_prefix_cache_equals_full_forward(arch, prefix):
    model = model_for(arch)
    ids = torch.randint(0, model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, 3, 20)
        again = model(ids, cache=cache, commit=prefix)
        suffix = model(ids[:, prefix:], cache=cache)
    assert torch.equal(again, full)  # committing does not change the forward itself
    assert cache.length == prefix
    torch.testing.assert_close(suffix, full[:, prefix:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_cache_exactness_on_a_padded_batch(arch):
    model = model_for(arch)
    prompts = [[3, 9, 11, 20, 21], [40, 41], [7, 8, 9, 10, 11, 12, 13]]
    batch = make_batch(prompts, 6, model.config.mask_id, model.config.pad_id)
    p = batch.prompt_len
    with torch.no_grad():
        full = model(batch.x, batch.positions, batch.attention_mask)
        cache = KVCache.for_model(model, 3, batch.x.shape[1])
        model(batch.x, batch.positions, batch.attention_mask, cache=cache, commit=p)
        suffix = model(batch.x[:, p:], batch.positions[:, p:], batch.attention_mask[:, p:], cache=cache)
    torch.testing.assert_close(suffix, full[:, p:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_padded_rows_equal_rows_alone(arch):
    model = model_for(arch)
    prompts = [[3, 9, 11, 20, 21], [40, 41], [7, 8, 9, 10, 11, 12, 13]]
    batch = make_batch(prompts, 4, model.config.mask_id, model.config.pad_id)
    with torch.no_grad():
        together = model(batch.x, batch.positions, batch.attention_mask)
        for i, p in enumerate(prompts):
            alone = make_batch([p], 4, model.config.mask_id, model.config.pad_id)
            logits = model(alone.x, alone.positions, alone.attention_mask)
            torch.testing.assert_close(together[i, -logits.shape[1]:], logits[0], rtol=1e-5, atol=1e-5)


def test_dream_logits_are_shifted_by_one_slot():
    import dataclasses

    dream = model_for("dream")
    unshifted = build_model(dataclasses.replace(dream.config, shift_logits=False)).eval()
    unshifted.load_state_dict(dream.state_dict())
    ids = torch.randint(0, dream.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        shifted, plain = dream(ids), unshifted(ids)
    assert torch.equal(shifted[:, 1:], plain[:, :-1])
    assert torch.equal(shifted[:, 0], plain[:, 0])


def test_commit_validation_and_overflow():
    model = model_for("llada")
    ids = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="commit=2 need a cache"):
        model(ids, commit=2)
    cache = KVCache.for_model(model, 1, 6)
    with pytest.raises(ValueError, match="commit=9"):
        model(ids, cache=cache, commit=9)
    model(ids, cache=cache, commit=5)
    with pytest.raises(ValueError, match="KVCache overflow"):
        model(ids[:, :2], cache=cache, commit=2)
    with pytest.raises(ValueError, match=r"truncate\(-1\)"):
        cache.truncate(-1)


def test_config_validation_names_the_value():
    with pytest.raises(ValueError, match="hidden_size=30 is not divisible by num_heads=4"):
        preset("llada", "tiny", hidden_size=30)
    with pytest.raises(ValueError, match="mask_id=999"):
        preset("llada", "tiny", mask_id=999)
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        preset("llada", "huge")
    with pytest.raises(ValueError, match="unknown architecture 'gpt'"):
        preset("gpt", "tiny")


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_dual_cache_block_equals_full_forward(arch):
    model = model_for(arch)
    prompts = [[3, 9, 11, 20, 21], [40, 41]]
    batch = make_batch(prompts, 12, model.config.mask_id, model.config.pad_id)
    total = batch.x.shape[1]
    s, e = batch.prompt_len + 4, batch.prompt_len + 8
    with torch.no_grad():
        cache = KVCache.for_model(model, 2, total)
        full = model(batch.x, batch.positions, batch.attention_mask, cache=cache, commit=total)
        block = model(batch.x[:, s:e], batch.positions[:, s:e], batch.attention_mask[:, s:e], cache=cache, start=s)
    torch.testing.assert_close(block, full[:, s:e], rtol=1e-5, atol=1e-5)
    assert cache.length == total  # a dual-cache read leaves the cache as it was


def test_refresh_by_truncating_and_recommitting():
    model = model_for("llada")
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = KVCache.for_model(model, 2, 16)
        model(ids, cache=cache, commit=6)
        stale = model(ids[:, 6:], cache=cache)
        changed = ids.clone()
        changed[:, 2] = (ids[:, 2] + 1) % model.config.vocab_size
        cache.truncate(0)
        full = model(changed, cache=cache, commit=10)
        after = model(changed[:, 10:], cache=cache)
    assert cache.length == 10
    torch.testing.assert_close(after, full[:, 10:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(stale[:, 4:], after)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_rows_with_different_prefix_lengths_see_what_they_would_alone(arch):
    """Row 0 cached to slot 5, row 1 to slot 9: one batched window forward equals each row alone."""
    model = model_for(arch)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(7))
    stale = ids.clone()
    stale[:, 1] = (ids[:, 1] + 3) % model.config.vocab_size  # the cached K/V saw another token here
    with torch.no_grad():
        cache = KVCache.for_model(model, 2, 16)
        model(stale, cache=cache, commit=torch.tensor([5, 9]))
        assert cache.row_length.tolist() == [5, 9] and cache.length == 5
        batched = model(ids[:, 5:], cache=cache, commit=torch.tensor([7, 12]))
        assert cache.row_length.tolist() == [7, 12]
        for row, cut in ((0, 5), (1, 9)):
            alone = KVCache.for_model(model, 1, 16)
            model(stale[row:row + 1], cache=alone, commit=cut)
            logits = model(ids[row:row + 1, cut:], cache=alone)
            torch.testing.assert_close(batched[row, cut - 5:], logits[0], rtol=1e-5, atol=1e-5)
