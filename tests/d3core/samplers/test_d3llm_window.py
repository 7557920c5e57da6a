"""The windowed ``d3llm`` (window="blocks"): what each step computes, batch invariance, and the cost metric."""

from __future__ import annotations

import pytest
import torch

from d3core.eval import synthetic
from d3core.samplers import get_sampler
from d3core.samplers.d3llm import D3LLMParams, D3LLMProgram
from d3core.samplers.engine import Decoder
from d3core.samplers.vanilla import VanillaParams
from d3core.sft import encode_prompt

pytestmark = pytest.mark.usefixtures("one_torch_thread")
D3LLM = get_sampler("d3llm")


@pytest.fixture(scope="module")
def prompts(tok):
    return [encode_prompt(tok, p.question) for p in synthetic.generate("test", 8, seed=31)]


@pytest.mark.parametrize("kwargs,match", [
    ({"window": "rows"}, "window='rows'"),
    ({"window": "blocks", "suffix": "keep"}, "suffix='keep'"),
    ({"window": "blocks", "lookahead": -1}, "lookahead=-1"),
    ({"suffix": "drop"}, "apply to window='blocks' only"),
    ({"suffix": "cache"}, "apply to window='blocks' only"),
    ({"lookahead": 1}, "apply to window='blocks' only"),
])
def test_bad_window_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        D3LLMParams(**kwargs)


def _plans(teacher, prompt, params, steps):
    """The row's plan at each of the first ``steps`` steps."""
    program = D3LLMProgram()
    d = Decoder(teacher, program, rows=1, capacity=128)
    row = d.add(prompt, params)
    seen = []
    original = program.plan

    def spy(r, decoder):
        plan = original(r, decoder)
        seen.append((plan.start, plan.end, plan.keys, row.state.created))
        return plan

    program.plan = spy
    for _ in range(steps):
        if not d.rows:
            break
        d.step()
    return seen, len(prompt)


def test_blocks_windows_end_at_the_newest_block_and_read_the_suffix_from_the_first_forward(teacher, prompts):
    params = D3LLMParams(gen_length=80, threshold=0.5, cache_delay_iter=2, window="blocks", suffix="cache")
    seen, p = _plans(teacher, prompts[0], params, 12)
    assert seen[0][:3] == (0, p + 80, p + 80)  # the first forward covers the canvas: the suffix's K/V
    for start, end, keys, created in seen[1:]:
        assert end == min(p + created * 16, p + 80) and keys == p + 80  # attends to the cached suffix
        assert start < end


def test_a_dropped_suffix_is_not_attended_and_lookahead_adds_blocks(teacher, prompts):
    drop, p = _plans(teacher, prompts[0], D3LLMParams(gen_length=80, cache_delay_iter=1, window="blocks"), 8)
    assert all(end == keys == min(p + created * 16, p + 80) for _, end, keys, created in drop)
    ahead, _ = _plans(teacher, prompts[0], D3LLMParams(gen_length=80, cache_delay_iter=1, window="blocks",
                                                       suffix="cache", lookahead=1), 8)
    assert all(end == min(p + (created + 1) * 16, p + 80) for _, end, _, created in ahead[1:])


def test_the_reference_window_still_runs_to_the_canvas_end(teacher, prompts):
    seen, p = _plans(teacher, prompts[0], D3LLMParams(gen_length=80, cache_delay_iter=2), 8)
    assert all(end == keys == p + 80 for _, end, keys, _ in seen)


@pytest.mark.parametrize("suffix", ["cache", "drop"])
def test_windowed_rows_decode_as_alone_in_a_batch(teacher, prompts, suffix):
    params = D3LLMParams(gen_length=64, threshold=0.5, cache_delay_iter=1, window="blocks", suffix=suffix)
    batch = D3LLM.generate(teacher, prompts, params).sequences
    for prompt, seq in zip(prompts, batch):
        alone = D3LLM.generate(teacher, [prompt], params).sequences[0]
        assert (seq.tokens, seq.nfe, seq.tokens_computed) == (alone.tokens, alone.nfe, alone.tokens_computed)


def test_windowed_decoding_computes_under_half_of_the_reference_on_a_long_canvas(teacher, prompts):
    ref = D3LLM.generate(teacher, prompts, D3LLMParams(gen_length=80, cache_delay_iter=2))
    win = D3LLM.generate(teacher, prompts, D3LLMParams(gen_length=80, cache_delay_iter=2, window="blocks",
                                                       suffix="drop"))
    assert win.forwards_per_token < 0.5 * ref.forwards_per_token
    assert all(s.tokens_computed > 0 for s in win.sequences)


def test_tokens_computed_counts_every_recomputed_slot(teacher, prompts):
    """Vanilla recomputes the whole row every step: its token-forwards are NFE x (prompt + generation)."""
    result = get_sampler("vanilla").generate(teacher, prompts[:3], VanillaParams(steps=24))
    for prompt, seq in zip(prompts, result.sequences):
        assert seq.tokens_computed == seq.nfe * (len(prompt) + 48)
        assert seq.forwards_per_token == pytest.approx(seq.nfe * (len(prompt) + 48) / 48)


def test_windowed_decoding_under_emulated_graph_replay_gives_the_eager_tokens(teacher, prompts):
    params = D3LLMParams(gen_length=64, threshold=0.5, cache_delay_iter=1, window="blocks", temperature=0.7)

    def decode(mode):
        d = Decoder(teacher, D3LLMProgram(), rows=8, capacity=128, graphs=mode, buckets=True)
        rows = [d.add(p, params, seed=5 + i) for i, p in enumerate(prompts)]
        while d.rows:
            d.step()
        return [r.result.tokens for r in rows], d

    eager, _ = decode("off")
    replayed, d = decode("emulate")
    assert d.graphs.replays > 0 and replayed == eager
    assert torch.is_inference_mode_enabled() is False
