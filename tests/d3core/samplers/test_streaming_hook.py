"""The ``on_step`` hook of every sampler: it changes nothing, and committed prefixes stream the final answer."""

from __future__ import annotations

import pytest
import torch

from d3core.eval import synthetic
from d3core.models.shipped import load_tiny_ar, load_tiny_tokenizer
from d3core.samplers import get_sampler
from d3core.sft import encode_prompt

SETTINGS = [
    ("d3llm", dict(threshold=0.5)),
    ("d3llm", dict(threshold=0.5, cache_delay_iter=1)),
    ("d3llm", dict(threshold=1.0, cache_delay_iter=2, refresh_interval=4, block_add_threshold=0.5)),
    ("fast_dllm", dict(threshold=0.7, cache="dual")),
    ("dparallel", dict(threshold=0.5, cache="prefix")),
    ("vanilla", dict()),
    ("apd", dict(kv_window=8)),
    ("ar", dict()),
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prompts():
    tok = load_tiny_tokenizer()
    problems = synthetic.generate("test", 4, seed=11)
    out = [encode_prompt(tok, p.question) for p in problems]
    out[1] = out[1][:12]  # rows of different lengths
    return out


@pytest.fixture(scope="module")
def ar_model():
    return load_tiny_ar()


def committed_prefix(row: list[int], undecided: int, eos_ids: tuple[int, ...]) -> list[int]:
    out = []
    for t in row:
        if t == undecided or t in eos_ids:
            break
        out.append(t)
    return out


@pytest.mark.parametrize("name,kwargs", SETTINGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SETTINGS)])
def test_hook_keeps_outputs_and_streams_the_final_response(teacher, ar_model, prompts, name, kwargs):
    spec = get_sampler(name)
    params = spec.params_cls(**kwargs)
    model = ar_model if spec.autoregressive else teacher
    plain = spec.generate(model, prompts, params, verifier=ar_model)

    snapshots = []
    hooked = spec.generate(model, prompts, params, verifier=ar_model, on_step=snapshots.append)

    for a, b in zip(plain.sequences, hooked.sequences):
        assert (a.tokens, a.nfe, a.unmask_step) == (b.tokens, b.nfe, b.unmask_step)
    if "batch_forwards" in hooked.stats:  # one call per batch forward
        assert len(snapshots) == hooked.stats["batch_forwards"]
    assert snapshots and all(s.tokens.shape == (len(prompts), params.gen_length) for s in snapshots)

    eos_ids = plain.sequences[0].eos_ids
    for r, seq in enumerate(hooked.sequences):
        streamed: list[int] = []
        for snap in snapshots:
            prefix = committed_prefix(snap.tokens[r].tolist(), snap.undecided, eos_ids)
            assert snap.committed[r] == len(prefix)
            assert prefix[:len(streamed)] == streamed, "a streamed token changed later"
            streamed.extend(prefix[len(streamed):])
        assert streamed == seq.response_ids
        # committed slots of the answer (and its EOS) never change afterwards
        end = len(seq.response_ids) + 1
        for before, after in zip(snapshots, snapshots[1:]):
            done = before.tokens[r][:end] != before.undecided
            assert torch.equal(before.tokens[r][:end][done], after.tokens[r][:end][done])


@pytest.mark.parametrize("name", ["d3llm", "fast_dllm", "vanilla", "ar"])
def test_exception_in_hook_aborts_decoding(teacher, ar_model, prompts, name):
    spec = get_sampler(name)
    calls = []

    class Stop(Exception):
        pass

    def hook(snapshot):
        calls.append(1)
        if len(calls) == 2:
            raise Stop

    model = ar_model if spec.autoregressive else teacher
    with pytest.raises(Stop):
        spec.generate(model, prompts, spec.params_cls(), on_step=hook)
    assert len(calls) == 2
