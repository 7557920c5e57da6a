"""Graph replay against eager decoding, on the CPU: :class:`~d3core.samplers.replay.EmulatedGraphs` gives
the CUDA-graph semantics (capture once per shape, later steps refresh the static buffer and relaunch the
recorded kernels on the same memory), so the runner's tokens must be the eager tokens at the same buckets."""

from __future__ import annotations

import asyncio

import pytest
import torch

from d3core.eval import synthetic
from d3core.samplers import graphs
from d3core.samplers.d3llm import D3LLMParams, D3LLMProgram
from d3core.samplers.dparallel import DParallelParams, DParallelProgram
from d3core.samplers.engine import Decoder
from d3core.samplers.fast_dllm import FastDLLMParams, FastDLLMProgram
from d3core.samplers.replay import CaptureError, EmulatedGraphs
from d3core.samplers.vanilla import VanillaParams, VanillaProgram
from d3core.sft import encode_prompt

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CASES = [
    (VanillaProgram, VanillaParams(steps=24)),
    (VanillaProgram, VanillaParams(steps=24, remasking="random")),
    (FastDLLMProgram, FastDLLMParams(threshold=0.9, cache="none")),
    (FastDLLMProgram, FastDLLMParams(threshold=0.7, cache="prefix")),
    (FastDLLMProgram, FastDLLMParams(threshold=0.7, cache="dual")),
    (FastDLLMProgram, FastDLLMParams(factor=1.0, cache="dual")),
    (DParallelProgram, DParallelParams(threshold=0.5)),
    (DParallelProgram, DParallelParams(threshold=0.5, cache="dual")),
    (D3LLMProgram, D3LLMParams(threshold=0.5)),
    (D3LLMProgram, D3LLMParams(threshold=0.5, cache_delay_iter=1)),
    (D3LLMProgram, D3LLMParams(threshold=0.3, cache_delay_iter=2, refresh_interval=4)),
]


def _id(case) -> str:
    program, params = case
    fields = {k: v for k, v in vars(params).items() if k in ("cache", "cache_delay_iter", "remasking", "factor")}
    return program.name + "-" + "-".join(f"{v}" for v in fields.values() if v is not None)


@pytest.fixture(scope="module")
def prompts(tok):
    return [encode_prompt(tok, p.question) for p in synthetic.generate("test", 16, seed=11)]


def decode(model, program, prompts, params, batch, mode, join_every=0):
    """Decode in groups of ``batch`` rows, or with ``join_every``, one row joining every that many steps."""
    d = Decoder(model, program(), rows=batch, capacity=128, graphs=mode, buckets=True)
    rows, queue, steps = [], list(enumerate(prompts)), 0

    def join() -> None:
        i, p = queue.pop(0)
        rows.append((i, d.add(p, params, seed=1000 + i)))

    while queue or d.rows:
        if join_every and queue and len(d.rows) < batch and (steps % join_every == 0 or not d.rows):
            join()
        while not join_every and queue and len(d.rows) < batch:
            join()
        d.step()
        steps += 1
    return [(r.result.tokens, r.result.nfe, r.result.unmask_step) for _, r in sorted(rows, key=lambda x: x[0])], d


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_replayed_steps_give_the_eager_tokens(teacher, prompts, case, batch, temperature):
    program, params = case
    params = type(params)(**{**vars(params), "temperature": temperature})
    n = 4 if batch == 1 else 16
    eager, _ = decode(teacher, program, prompts[:n], params, batch, "off")
    replayed, d = decode(teacher, program, prompts[:n], params, batch, "emulate")
    assert d.graphs.captures > 0 and d.graphs.replays > 0
    assert replayed == eager


@pytest.mark.parametrize("case", [CASES[4], CASES[9]], ids=[_id(CASES[4]), _id(CASES[9])])
def test_rows_joining_and_leaving_between_replays_keep_the_eager_tokens(teacher, prompts, case):
    program, params = case
    eager, _ = decode(teacher, program, prompts, params, 4, "off", join_every=3)
    replayed, d = decode(teacher, program, prompts, params, 4, "emulate", join_every=3)
    assert d.graphs.replays > d.graphs.captures
    assert replayed == eager


def test_the_serving_engine_under_replay_gives_each_request_its_eager_answer(teacher, tok, prompts):
    from serve_apps.batching import ContinuousEngine
    from serve_apps.requests import GenerationRequest

    settings = [D3LLMParams(threshold=t, cache_delay_iter=c, temperature=temp)
                for t, c, temp in ((0.5, 2, 0.0), (0.3, None, 0.0), (0.5, 2, 0.8), (1.0, 1, 0.0))]
    reqs = [GenerationRequest(tuple(p), settings[i % 4], seed=7 + i, max_tokens=None if i % 3 else 12)
            for i, p in enumerate(prompts[:12])]

    async def serve(mode: str):
        engine = ContinuousEngine(teacher, tok, max_batch_size=4, graphs=mode, buckets=True)
        try:
            async def late(i, r):
                await asyncio.sleep(0.01 * i)  # rows join (and leave at max_tokens) between steps
                return await engine.generate(r)

            outs = await asyncio.gather(*(late(i, r) for i, r in enumerate(reqs)))
            runner = next(iter(engine._decoders.values())).graphs
            return [(o.choices[0].text, o.choices[0].token_ids, o.choices[0].nfe) for o in outs], runner
        finally:
            await engine.close()

    replayed, runner = asyncio.run(serve("emulate"))
    assert runner.replays > 0
    for i, r in enumerate(reqs):  # each request decoded alone, eagerly, at the same buckets
        ref, _ = asyncio.run(_serve_one(teacher, tok, r))
        assert replayed[i] == ref, i


async def _serve_one(teacher, tok, req):
    from serve_apps.batching import ContinuousEngine

    engine = ContinuousEngine(teacher, tok, max_batch_size=4, graphs="off", buckets=True)
    try:
        out = await engine.generate(req)
        return (out.choices[0].text, out.choices[0].token_ids, out.choices[0].nfe), None
    finally:
        await engine.close()


# ---------------------------------------------------------------- the emulator itself
def test_a_replay_recomputes_from_the_refreshed_buffer():
    buffer = torch.tensor([1, 2, 3])
    replay, out = EmulatedGraphs().capture(lambda: (buffer * 2).bool().long() + buffer, warmup=1)
    buffer.copy_(torch.tensor([0, 5, 0]))
    replay()
    assert out.tolist() == [0, 6, 0]


def test_a_tensor_made_outside_the_capture_keeps_its_first_value_as_on_a_gpu():
    buffer = torch.tensor([1, 0, 1])
    mask = buffer.bool()  # derived from step data before the capture: the old runner's bug
    replay, out = EmulatedGraphs().capture(lambda: torch.where(mask, buffer, -1), warmup=0)
    buffer.copy_(torch.tensor([0, 7, 0]))
    replay()
    assert out.tolist() == [0, -1, 0]  # the stale mask, not [-1, 7, -1]


@pytest.mark.parametrize("read", [lambda b: b.sum().item(), lambda b: b.nonzero(), lambda b: b[b > 0]])
def test_a_host_read_inside_a_capture_is_refused(read):
    buffer = torch.tensor([1, 0, 2])
    with pytest.raises(CaptureError, match="host"):
        EmulatedGraphs().capture(lambda: read(buffer), warmup=0)


def test_graph_modes_resolve_and_refuse_cuda_without_a_gpu(monkeypatch):
    cpu = torch.device("cpu")
    assert graphs.resolve(None, cpu) == "off"
    assert graphs.resolve("emulate", cpu) == "emulate"
    with graphs.graph_mode("emulate"):
        assert graphs.resolve(None, cpu) == "emulate"
    monkeypatch.setenv(graphs.MODE_ENV, "emulate")
    assert graphs.resolve(None, cpu) == "emulate"
    monkeypatch.setenv(graphs.MODE_ENV, "sometimes")
    with pytest.raises(ValueError, match="D3RAY_GRAPHS='sometimes'"):
        graphs.resolve(None, cpu)
    with pytest.raises(ValueError, match="need a CUDA device"):
        graphs.resolve(True, cpu)


# ---------------------------------------------------------------- decoders and graphs kept across calls
def test_generate_keeps_its_decoder_and_graphs_across_calls_of_one_bucket(tok):
    import copy
    import pickle

    from d3core.models.shipped import load_tiny_teacher
    from d3core.samplers import get_sampler
    from d3core.samplers.generation import DecoderPool

    model = load_tiny_teacher()  # a model of its own: its pool starts empty
    spec, params = get_sampler("d3llm"), D3LLMParams(threshold=0.5, cache_delay_iter=1)
    batches = [[encode_prompt(tok, p.question) for p in synthetic.generate("test", 4, seed=s)] for s in (21, 22, 23)]
    with graphs.graph_mode("emulate"):
        results = [spec.generate(model, b, params, generator=torch.Generator().manual_seed(0)) for b in batches]
    first, later = results[0].stats, [r.stats for r in results[1:]]
    assert first["graph_captures"] > 0
    assert all(s["graph_captures"] < first["graph_captures"] and s["graph_replays"] > 0 for s in later), later
    assert len(DecoderPool.of(model)) == 1
    # the same calls eagerly, on a decoder of the pooled shape, give the same tokens
    decoder = next(iter(DecoderPool.of(model).values()))
    for b, res in zip(batches, results):
        eager = Decoder(model, D3LLMProgram(), rows=len(b), capacity=decoder.capacity, graphs="off", buckets=True)
        seeds = [s for s in torch.randint(0, 2**62, (len(b),), generator=torch.Generator().manual_seed(0)).tolist()]
        rows = [eager.add(p, params, seed) for p, seed in zip(b, seeds)]
        while eager.rows:
            eager.step()
        assert [r.result.tokens for r in rows] == [s.tokens for s in res.sequences]
    assert len(DecoderPool.of(copy.deepcopy(model))) == 0  # copies and pickles start without graphs
    assert len(pickle.loads(pickle.dumps(model)).__dict__.get(DecoderPool.ATTR, {})) == 0


def test_a_hook_that_raises_leaves_the_pooled_decoder_empty_for_the_next_call(tok):
    from d3core.models.shipped import load_tiny_teacher
    from d3core.samplers import get_sampler
    from d3core.samplers.generation import DecoderPool

    model = load_tiny_teacher()
    spec, params = get_sampler("fast_dllm"), FastDLLMParams(threshold=0.9, cache="dual")
    prompts = [encode_prompt(tok, p.question) for p in synthetic.generate("test", 2, seed=3)]

    def hook(snapshot):
        raise KeyboardInterrupt

    with graphs.graph_mode("emulate"):
        with pytest.raises(KeyboardInterrupt):
            spec.generate(model, prompts, params, on_step=hook)
        assert not next(iter(DecoderPool.of(model).values())).rows
        again = spec.generate(model, prompts, params)
    assert len(again.sequences) == 2 and all(s.nfe > 0 for s in again.sequences)
