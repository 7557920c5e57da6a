"""The vanilla (LLaDA low-confidence remasking) sampler and the AR sampler on small models."""

from __future__ import annotations

import pytest
import torch

from d3core.models.ar import build_ar_model
from d3core.models.registry import build_model
from d3core.samplers import get_sampler
from d3core.samplers.ar import ARParams
from d3core.samplers.vanilla import VanillaParams, generate, transfer_schedule

SMALL = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
PROMPTS = [[2, 6, 10, 11, 12], [2, 6, 30], [2, 6, 40, 41, 42, 43, 44, 45], [2, 6, 50, 51],
           [2, 6, 60, 61, 62, 63, 64], [2, 6, 70], [2, 6, 80, 81, 82, 83, 84, 85, 86, 87], [2, 6, 90, 91]]


@pytest.fixture(scope="module", params=["llada", "dream"])
def model(request):
    kv = 4 if request.param == "llada" else 2
    return build_model(request.param, "tiny", seed=0, num_kv_heads=kv, **SMALL).eval()


def test_transfer_schedule_front_loads_the_remainder():
    assert transfer_schedule(16, 16) == [1] * 16
    assert transfer_schedule(10, 4) == [3, 3, 2, 2]
    assert sum(transfer_schedule(37, 5)) == 37


def test_one_token_per_step_in_block_order(model):
    params = VanillaParams(gen_length=12, block_length=4)
    result = generate(model, PROMPTS[:3], params)
    for seq in result.sequences:
        assert seq.nfe == 12
        assert sorted(seq.unmask_step) == list(range(12))
        for blk in range(3):
            steps = seq.unmask_step[blk * 4:(blk + 1) * 4]
            assert sorted(steps) == list(range(blk * 4, (blk + 1) * 4))
        assert model.config.mask_id not in seq.tokens


def test_fewer_steps_commit_several_tokens_per_step(model):
    result = generate(model, PROMPTS[:2], VanillaParams(gen_length=12, block_length=6, steps=4))
    for seq in result.sequences:
        assert seq.nfe == 4
        counts = [seq.unmask_step.count(s) for s in range(4)]
        assert counts == [3, 3, 3, 3]


def test_batch_of_mixed_lengths_equals_each_prompt_alone(model):
    params = VanillaParams(gen_length=8, block_length=4)
    together = generate(model, PROMPTS, params)
    for prompt, seq in zip(PROMPTS, together.sequences):
        alone = generate(model, [prompt], params).sequences[0]
        assert seq.tokens == alone.tokens
        assert seq.unmask_step == alone.unmask_step


def test_sampling_is_reproducible_with_a_generator(model):
    params = VanillaParams(gen_length=8, block_length=8, temperature=1.0)
    a = generate(model, PROMPTS[:4], params, generator=torch.Generator().manual_seed(5))
    b = generate(model, PROMPTS[:4], params, generator=torch.Generator().manual_seed(5))
    c = generate(model, PROMPTS[:4], params, generator=torch.Generator().manual_seed(6))
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert [s.tokens for s in a.sequences] != [s.tokens for s in c.sequences]


@pytest.mark.parametrize("kwargs,match", [
    (dict(gen_length=10, block_length=4), "block_length=4 does not divide gen_length=10"),
    (dict(gen_length=8, block_length=4, steps=3), "steps=3 must be a positive multiple"),
    (dict(gen_length=8, block_length=4, steps=16), "steps=16 > gen_length=8"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(remasking="oracle"), "remasking='oracle'"),
])
def test_bad_params_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VanillaParams(**kwargs)


def test_bad_prompts_are_refused(model):
    with pytest.raises(ValueError, match="prompts is empty"):
        generate(model, [], VanillaParams())
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(model, [[]], VanillaParams())
    with pytest.raises(ValueError, match="> the model's context 128"):
        generate(model, [[2] * 100], VanillaParams(gen_length=48, block_length=16))
    with pytest.raises(ValueError, match=r"token ids \[9999\] outside the vocabulary"):
        generate(model, [[2, 9999]], VanillaParams())


def test_registry():
    assert get_sampler("vanilla").params_cls is VanillaParams
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        get_sampler("nope")


def test_ar_greedy_batch_equals_alone_and_matches_hf_generate():
    model = build_ar_model(seed=0).eval()
    params = ARParams(gen_length=6)
    together = get_sampler("ar").generate(model, PROMPTS[:4], params)
    for prompt, seq in zip(PROMPTS[:4], together.sequences):
        alone = get_sampler("ar").generate(model, [prompt], params).sequences[0]
        assert seq.tokens == alone.tokens
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                            attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        new = hf[0, len(prompt):].tolist()
        assert seq.tokens[: len(new)] == new
