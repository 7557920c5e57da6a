"""The decode engine's step API: rows join and leave between steps and still decode exactly as alone."""

from __future__ import annotations

import pytest
import torch

from d3core.eval import synthetic
from d3core.samplers import get_sampler
from d3core.samplers.d3llm import D3LLMParams, D3LLMProgram
from d3core.samplers.dparallel import DParallelParams, DParallelProgram
from d3core.samplers.engine import Decoder
from d3core.samplers.fast_dllm import FastDLLMParams, FastDLLMProgram
from d3core.samplers.vanilla import VanillaParams, VanillaProgram
from d3core.sft import encode_prompt

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROGRAMS = [
    (D3LLMProgram, D3LLMParams(threshold=0.5, cache_delay_iter=2), "d3llm"),
    (D3LLMProgram, D3LLMParams(threshold=1.0), "d3llm"),
    (FastDLLMProgram, FastDLLMParams(threshold=0.7, cache="dual"), "fast_dllm"),
    (DParallelProgram, DParallelParams(threshold=0.5, cache="prefix"), "dparallel"),
    (VanillaProgram, VanillaParams(), "vanilla"),
]


@pytest.fixture(scope="module")
def prompts(tok):
    return [encode_prompt(tok, p.question) for p in synthetic.generate("test", 10, seed=4)]


def alone(teacher, name, params, prompt, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return get_sampler(name).generate(teacher, [prompt], params, generator=gen).sequences[0]


@pytest.mark.parametrize("program,params,name", PROGRAMS, ids=[f"{p[2]}-{i}" for i, p in enumerate(PROGRAMS)])
def test_rows_joining_mid_decode_give_the_tokens_they_give_alone(teacher, prompts, program, params, name):
    d = Decoder(teacher, program(), rows=4, capacity=128)
    queue, rows, steps = list(prompts), [], 0
    while queue or d.rows:
        while queue and len(d.rows) < 4 and (steps % 3 == 0 or not d.rows):  # join every third step
            rows.append((queue[0], d.add(queue.pop(0), params, seed=0)))
        d.step()
        steps += 1
        assert steps < 2000
    for prompt, row in rows:
        ref = alone(teacher, name, params, prompt)
        assert (row.result.tokens, row.result.nfe, row.result.unmask_step) == (ref.tokens, ref.nfe, ref.unmask_step)


def test_per_row_thresholds_share_a_step(teacher, prompts):
    """Rows with different thresholds (and rules) in one decoder match each decoded alone with its own."""
    settings = [D3LLMParams(threshold=t, cache_delay_iter=c, commit_rule=r)
                for t, c, r in ((0.2, None, None), (1.0, 2, None), (0.5, None, "dream"), (0.7, 1, "llada"))]
    d = Decoder(teacher, D3LLMProgram(), rows=4, capacity=128)
    rows = [d.add(p, s) for p, s in zip(prompts, settings)]
    while d.rows:
        d.step()
    for p, s, row in zip(prompts, settings, rows):
        ref = alone(teacher, "d3llm", s, p)
        assert (row.result.tokens, row.result.nfe) == (ref.tokens, ref.nfe)


def test_sampled_rows_depend_on_their_own_seed_only(teacher, prompts):
    hot = D3LLMParams(threshold=0.5, temperature=0.9)
    d = Decoder(teacher, D3LLMProgram(), rows=3, capacity=128)
    a = d.add(prompts[0], hot, seed=11)
    d.add(prompts[1], hot, seed=12)
    d.add(prompts[2], D3LLMParams(threshold=0.5), seed=13)
    while d.rows:
        d.step()
    solo = Decoder(teacher, D3LLMProgram(), rows=1, capacity=128)
    b = solo.add(prompts[0], hot, seed=11)
    while solo.rows:
        solo.step()
    assert a.result.tokens == b.result.tokens
    other = Decoder(teacher, D3LLMProgram(), rows=1, capacity=128)
    c = other.add(prompts[0], hot, seed=99)
    while other.rows:
        other.step()
    assert c.result.tokens != a.result.tokens  # the seed matters


def test_cancel_frees_the_row_and_keeps_the_others_exact(teacher, prompts):
    params = D3LLMParams(threshold=0.5, cache_delay_iter=2)
    d = Decoder(teacher, D3LLMProgram(), rows=3, capacity=128)
    rows = [d.add(p, params) for p in prompts[:3]]
    d.step()
    d.step()
    d.cancel(rows[0])  # the last row moves into its cache slot
    assert rows[0].result is not None and rows[0] not in d.rows and len(d.rows) == 2
    late = d.add(prompts[3], params)
    while d.rows:
        d.step()
    for p, row in zip(prompts[1:4], rows[1:] + [late]):
        assert row.result.tokens == alone(teacher, "d3llm", params, p).tokens


def test_bad_rows_are_refused_without_changing_the_decoder(teacher, prompts):
    d = Decoder(teacher, D3LLMProgram(), rows=1, capacity=64)
    with pytest.raises(ValueError, match="exceeds this decoder's capacity 64"):
        d.add([2] * 30, D3LLMParams(gen_length=48))
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        d.add([], D3LLMParams())
    d.add(prompts[0][:10], D3LLMParams())
    with pytest.raises(ValueError, match="decoder is full"):
        d.add(prompts[1][:10], D3LLMParams())
    two = Decoder(teacher, D3LLMProgram(), rows=2, capacity=64)
    two.add(prompts[0][:10], D3LLMParams())
    with pytest.raises(ValueError, match="segment length 8 differs"):
        two.add(prompts[1][:10], D3LLMParams(block_length=8))
    assert len(two.rows) == 1


@pytest.mark.parametrize("name", ["d3llm", "fast_dllm", "dparallel", "vanilla", "apd"])
def test_a_model_that_predicts_the_mask_token_still_finishes_without_it(name, prompts):
    from d3core.models.registry import build_model
    from d3core.models.shipped import load_tiny_ar

    model = build_model("llada", "tiny", seed=1).eval()
    hidden = {}
    model.norm.register_forward_hook(lambda mod, args, out: hidden.__setitem__("h", out))
    with torch.no_grad():
        model(torch.tensor([prompts[0]]))
        direction = hidden["h"][0].mean(0)
        model.head.weight[model.config.mask_id] = direction / direction.norm() * 50  # the mask always wins
        assert (model(torch.tensor([prompts[1]])).argmax(-1) == model.config.mask_id).float().mean() > 0.9
    spec = get_sampler(name)
    result = spec.generate(model, prompts[:3], spec.params_cls(), verifier=load_tiny_ar())
    for seq in result.sequences:
        assert model.config.mask_id not in seq.tokens


def test_steps_in_a_fresh_thread_build_no_autograd_graph(teacher, prompts):
    """The serving engine steps a Decoder from its own thread, where grad mode is on by default: the
    cache and every per-step tensor must stay out of autograd, or each step's activations are kept
    alive through the cache's history (memory grew ~20 MB per step before the fix)."""
    import threading

    d = Decoder(teacher, D3LLMProgram(), rows=4, capacity=128)
    seen = {}

    def serve():
        seen["grad_enabled"] = torch.is_grad_enabled()
        try:
            for p in prompts[:6]:
                if len(d.rows) < d.max_rows:  # rows join while there is room
                    d.add(p, D3LLMParams(threshold=0.5, cache_delay_iter=2))
                d.step()
            d.cancel(d.rows[0])
            while d.rows:
                d.step()
        except Exception as e:  # reported below: an exception in the thread must fail the test
            seen["error"] = e

    worker = threading.Thread(target=serve)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive() and seen["grad_enabled"] and "error" not in seen, seen.get("error")
    cache = d.cache
    for t in (cache.keys, cache.values) + ((cache.hidden,) if cache.hidden is not None else ()):
        assert not t.requires_grad and t.grad_fn is None


def test_a_decode_in_inference_mode_leaves_plain_tensors_for_training_and_hooks():
    """Decoding runs in inference mode. What it caches for later callers (RoPE frequencies, the
    mask-avoiding index) and the snapshots it hands to ``on_step`` stay plain tensors: a hook may edit
    its snapshot in place, and a training step after the first decode runs its backward."""
    from d3core.models.layers import inverse_frequencies
    from d3core.models.registry import build_model
    from d3core.samplers.logits import choose

    model = build_model("llada", "tiny", seed=0, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=4,
                        intermediate_size=64, rope_theta=4321.0)  # a theta no other test uses: its RoPE table is first made here
    snapshots = []
    get_sampler("vanilla").generate(model.eval(), [[5, 6, 7]], VanillaParams(gen_length=8, block_length=8),
                                    on_step=snapshots.append)
    assert snapshots and not snapshots[-1].tokens.is_inference()
    assert not inverse_frequencies(8, 4321.0, torch.device("cpu")).is_inference()  # made during the decode
    scores = torch.zeros(2, model.config.vocab_size, requires_grad=True)
    choose(scores * 2, model.config.mask_id)  # its cached index may meet autograd outside inference mode
    snapshots[-1].tokens.add_(0)  # an inference tensor would refuse this outside inference mode
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    model.embed.weight.requires_grad_(True)
    loss = model(ids).logsumexp(-1).mean()
    loss.backward()  # would raise "Inference tensors cannot be saved for backward"
    assert model.embed.weight.grad is not None


def test_row_outputs_carry_each_answer_once_in_order_and_say_how_it_ended(teacher, prompts):
    """What a server reads instead of the decoder's slots: final answer tokens as they settle, then the end."""
    params = D3LLMParams(threshold=0.5, cache_delay_iter=2)
    d = Decoder(teacher, D3LLMProgram(), rows=4, capacity=128, emit_outputs=True)
    rows = [d.add(p, params) for p in prompts[:4]]
    got = {id(r): [] for r in rows}
    reasons, ends = {id(r): [] for r in rows}, {id(r): 0 for r in rows}
    while d.rows:
        for out in d.step().outputs:
            got[id(out.row)] += out.token_ids
            reasons[id(out.row)].append(out.finish_reason)
            ends[id(out.row)] += out.ended
    for r in rows:
        assert got[id(r)] == r.result.response_ids  # every final token once, in order, nothing after EOS
        assert [x for x in reasons[id(r)] if x] and ends[id(r)] == 1
        final = [x for x in reasons[id(r)] if x][0]
        assert final == ("stop" if len(r.result.response_ids) < params.gen_length else "length")
        assert sum(1 for x in reasons[id(r)] if x is None) >= 1  # tokens arrived before the answer ended
