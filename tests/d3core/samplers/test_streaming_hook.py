"""d3llm's ``on_step`` hook: it changes nothing, and committed prefixes stream the final answer."""

from __future__ import annotations

import pytest
import torch

from d3core.eval import synthetic
from d3core.models.shipped import load_tiny_tokenizer
from d3core.samplers import get_sampler
from d3core.sft import encode_prompt

SETTINGS = [
    dict(threshold=0.5),
    dict(threshold=0.5, cache_delay_iter=1),
    dict(threshold=1.0, cache_delay_iter=2, refresh_interval=4, block_add_threshold=0.5),
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prompts():
    tok = load_tiny_tokenizer()
    problems = synthetic.generate("test", 4, seed=11)
    out = [encode_prompt(tok, p.question) for p in problems]
    out[1] = out[1][:12]  # rows of different lengths
    return out


def committed_prefix(row: list[int], mask_id: int, eos_ids: tuple[int, ...]) -> list[int]:
    out = []
    for t in row:
        if t == mask_id or t in eos_ids:
            break
        out.append(t)
    return out


@pytest.mark.parametrize("kwargs", SETTINGS, ids=["no-cache", "cache", "cache-refresh"])
def test_hook_keeps_outputs_and_streams_the_final_response(teacher, prompts, kwargs):
    spec = get_sampler("d3llm")
    params = spec.params_cls(**kwargs)
    cfg = teacher.config
    plain = spec.generate(teacher, prompts, params)

    snapshots: list[torch.Tensor] = []
    hooked = spec.generate(teacher, prompts, params, on_step=lambda slots: snapshots.append(slots.clone()))

    for a, b in zip(plain.sequences, hooked.sequences):
        assert a.tokens == b.tokens
        assert a.nfe == b.nfe
        assert a.unmask_step == b.unmask_step
    # one call per batch forward, each with every row's generation slots
    assert len(snapshots) == hooked.stats["batch_forwards"]
    assert all(s.shape == (len(prompts), params.gen_length) for s in snapshots)

    for r, seq in enumerate(hooked.sequences):
        streamed: list[int] = []
        for snap in snapshots:
            prefix = committed_prefix(snap[r].tolist(), cfg.mask_id, cfg.eos_ids)
            assert prefix[:len(streamed)] == streamed, "a streamed token changed later"
            streamed.extend(prefix[len(streamed):])
        assert streamed == seq.response_ids
        assert len(streamed) > 0
        # committed slots of the answer (and its EOS) never change afterwards
        end = len(seq.response_ids) + 1
        for before, after in zip(snapshots, snapshots[1:]):
            done = before[r][:end] != cfg.mask_id
            assert torch.equal(before[r][:end][done], after[r][:end][done])


def test_exception_in_hook_aborts_decoding(teacher, prompts):
    spec = get_sampler("d3llm")
    calls = []

    class Stop(Exception):
        pass

    def hook(slots):
        calls.append(1)
        if len(calls) == 2:
            raise Stop

    with pytest.raises(Stop):
        spec.generate(teacher, prompts, spec.params_cls(), on_step=hook)
    assert len(calls) == 2
