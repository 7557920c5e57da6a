"""BatchingEngine without Ray: batching, grouping by parameters, streaming, timeouts, errors."""

from __future__ import annotations

import asyncio
import time

import pytest

from d3core.eval import synthetic
from d3core.models.shipped import load_tiny_tokenizer
from d3core.samplers import get_sampler
from d3core.sft import encode_prompt
from serve_apps.engine import BatchingEngine, EngineTimeout, GenerationOutput, GenerationRequest

D3LLM = get_sampler("d3llm")
PARAMS = D3LLM.params_cls(cache_delay_iter=1)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prompts():
    tok = load_tiny_tokenizer()
    return [tuple(encode_prompt(tok, p.question)) for p in synthetic.generate("test", 8, seed=5)]


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_are_batched_and_match_one_by_one(teacher, prompts):
    async def main():
        engine = BatchingEngine(teacher, max_batch_size=8, batch_wait_timeout_s=0.05)
        together = await asyncio.gather(*(engine.generate(GenerationRequest(p, PARAMS)) for p in prompts))
        alone = [await engine.generate(GenerationRequest(p, PARAMS)) for p in prompts]
        await engine.close()
        return engine, together, alone

    engine, together, alone = run(main())
    assert [o.batch_size for o in together] == [8] * 8
    assert [o.batch_size for o in alone] == [1] * 8
    for a, b in zip(together, alone):
        assert a.token_ids == b.token_ids
        assert a.nfe == b.nfe
    reference = D3LLM.generate(teacher, [list(p) for p in prompts], PARAMS)
    assert [o.token_ids for o in together] == [tuple(s.response_ids) for s in reference.sequences]
    assert engine.stats["batches"] == 9 and engine.stats["max_batch"] == 8


def test_requests_with_different_params_are_never_mixed(teacher, prompts):
    other = D3LLM.params_cls(cache_delay_iter=1, threshold=0.2)

    async def main():
        engine = BatchingEngine(teacher, max_batch_size=16, batch_wait_timeout_s=0.05)
        reqs = [GenerationRequest(p, PARAMS if i % 2 else other) for i, p in enumerate(prompts)]
        outs = await asyncio.gather(*(engine.generate(r) for r in reqs))
        await engine.close()
        return reqs, outs

    reqs, outs = run(main())
    assert sorted(o.batch_size for o in outs) == [4] * 8
    for r, o in zip(reqs, outs):
        ref = D3LLM.generate(teacher, [list(r.prompt_ids)], r.params).sequences[0]
        assert o.token_ids == tuple(ref.response_ids)


def test_stream_sends_committed_tokens_in_order_ending_in_the_answer(teacher, prompts):
    async def main():
        engine = BatchingEngine(teacher, max_batch_size=4, batch_wait_timeout_s=0.05)

        async def consume(p):
            chunks, final = [], None
            async for event in engine.stream(GenerationRequest(p, PARAMS)):
                if isinstance(event, GenerationOutput):
                    final = event
                else:
                    chunks.append(list(event))
            return chunks, final

        res = await asyncio.gather(*(consume(p) for p in prompts[:4]))
        await engine.close()
        return res

    for chunks, final in run(main()):
        assert len(chunks) >= 2, "tokens should arrive over several steps"
        assert all(chunks), "no empty deltas"
        assert [t for c in chunks for t in c] == list(final.token_ids)
        assert final.finish_reason == "stop" and final.batch_size == 4


def test_max_tokens_truncates_stream_and_result(teacher, prompts):
    async def main():
        engine = BatchingEngine(teacher, max_batch_size=1)
        full = await engine.generate(GenerationRequest(prompts[0], PARAMS))
        streamed = []
        final = None
        async for event in engine.stream(GenerationRequest(prompts[0], PARAMS, max_tokens=5)):
            if isinstance(event, GenerationOutput):
                final = event
            else:
                streamed.extend(event)
        await engine.close()
        return full, streamed, final

    full, streamed, final = run(main())
    assert len(full.token_ids) > 5
    assert final.token_ids == full.token_ids[:5] and final.finish_reason == "length"
    assert streamed == list(final.token_ids)


def test_timeout_fails_the_request_and_abandons_its_batch(teacher, prompts):
    # one token per forward over all 96 slots (no EOS stop): ~100 forwards, far beyond the 0.05 s deadline
    slow = D3LLM.params_cls(gen_length=96, block_length=16, threshold=0.0, early_stop=False)

    async def main():
        engine = BatchingEngine(teacher, max_batch_size=4)
        started = time.monotonic()
        with pytest.raises(EngineTimeout):
            await engine.generate(GenerationRequest(prompts[0], slow, timeout_s=0.05))
        waited = time.monotonic() - started
        # the engine stays usable: the abandoned batch stops at its next step
        ok = await engine.generate(GenerationRequest(prompts[1], PARAMS, timeout_s=30))
        await engine.close()
        return engine, waited, ok

    engine, waited, ok = run(main())
    assert waited < 1.0
    assert engine.stats["abandoned"] == 1 and engine.stats["timeouts"] == 1
    assert ok.finish_reason == "stop"


def test_bad_prompt_is_a_value_error_before_queueing(teacher):
    async def main():
        engine = BatchingEngine(teacher)
        with pytest.raises(ValueError, match="empty"):
            await engine.generate(GenerationRequest((), PARAMS))
        with pytest.raises(ValueError, match="context"):
            await engine.generate(GenerationRequest(tuple([7] * 120), PARAMS))
        await engine.close()
        return engine

    assert run(main()).stats["requests"] == 0


def test_sampling_requests_group_by_seed_and_reproduce(teacher, prompts):
    hot = D3LLM.params_cls(temperature=0.9)

    async def main():
        engine = BatchingEngine(teacher, max_batch_size=8, batch_wait_timeout_s=0.05)
        a = await asyncio.gather(*(engine.generate(GenerationRequest(p, hot, seed=s)) for p, s in
                                   zip(prompts[:4], [1, 1, 2, 2])))
        b = await asyncio.gather(*(engine.generate(GenerationRequest(p, hot, seed=s)) for p, s in
                                   zip(prompts[:4], [1, 1, 2, 2])))
        await engine.close()
        return a, b

    a, b = run(main())
    assert [o.batch_size for o in a] == [2, 2, 2, 2]
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_invalid_engine_settings_name_the_value(teacher):
    with pytest.raises(ValueError, match="max_batch_size=0"):
        BatchingEngine(teacher, max_batch_size=0)
    with pytest.raises(ValueError, match="timeout_s=0"):
        GenerationRequest((1, 2), PARAMS, timeout_s=0)
