"""The continuous-batching engine against in-process decodes: joins, per-row params, stops, faults."""

from __future__ import annotations

import asyncio

import pytest

from d3core.eval import synthetic
from d3core.samplers import get_sampler
from d3core.samplers.d3llm import D3LLMParams, D3LLMProgram
from d3core.sft import encode_prompt
from serve_apps.batching import ContinuousEngine
from serve_apps.outputs import Delta
from serve_apps.requests import EngineOverloaded, EngineTimeout, GenerationRequest, RequestFailed

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D3LLM = get_sampler("d3llm")
PARAMS = D3LLMParams(threshold=0.5, cache_delay_iter=2)


@pytest.fixture(scope="module")
def prompts(tok):
    return [tuple(encode_prompt(tok, p.question)) for p in synthetic.generate("test", 12, seed=5)]


def run(coro):
    return asyncio.run(coro)


def response_text(tok, teacher, prompt, params):
    seq = D3LLM.generate(teacher, [list(prompt)], params).sequences[0]
    return tok.decode(seq.response_ids, skip_special_tokens=True), seq


async def with_engine(teacher, tok, body, **kw):
    engine = ContinuousEngine(teacher, tok, **kw)
    try:
        return await body(engine)
    finally:
        await engine.close()


def test_requests_arriving_at_different_times_match_alone(teacher, tok, prompts):
    async def body(engine):
        async def late(i, p):
            await asyncio.sleep(0.01 * i)  # joins at some later step of the running batch
            return await engine.generate(GenerationRequest(p, PARAMS))

        outs = await asyncio.gather(*(late(i, p) for i, p in enumerate(prompts)))
        return outs, engine.stats

    outs, stats = run(with_engine(teacher, tok, body, max_batch_size=4))
    assert stats["max_batch"] > 1
    for p, out in zip(prompts, outs):
        text, seq = response_text(tok, teacher, p, PARAMS)
        assert out.choices[0].text == text
        assert out.choices[0].nfe == seq.nfe
        assert list(out.choices[0].token_ids) == seq.response_ids


def test_different_thresholds_and_seeds_share_steps_and_keep_their_own_tokens(teacher, tok, prompts):
    settings = [D3LLMParams(threshold=t, cache_delay_iter=c, temperature=temp)
                for t, c, temp in ((0.2, None, 0.0), (1.0, 2, 0.0), (0.5, 2, 0.8), (0.7, None, 0.8))]

    async def body(engine):
        reqs = [GenerationRequest(p, s, seed=100 + i) for i, (p, s) in enumerate(zip(prompts, settings))]
        together = await asyncio.gather(*(engine.generate(r) for r in reqs))
        alone = [await engine.generate(r) for r in reqs]
        return together, alone, engine.stats

    together, alone, stats = run(with_engine(teacher, tok, body, max_batch_size=4))
    assert stats["max_batch"] == 4
    for a, b in zip(together, alone):
        assert a.choices[0].text == b.choices[0].text  # seeded sampling too: a row depends on its own seed only
    for p, s, a in zip(prompts[:2], settings[:2], together[:2]):
        assert a.choices[0].text == response_text(tok, teacher, p, s)[0]


def test_stream_deltas_are_final_and_concatenate_to_the_answer(teacher, tok, prompts):
    async def body(engine):
        deltas, final = [], None
        async for event in engine.stream(GenerationRequest(prompts[0], PARAMS)):
            if isinstance(event, Delta):
                deltas.append(event.text)
            else:
                final = event
        return deltas, final

    deltas, final = run(with_engine(teacher, tok, body))
    assert len(deltas) > 1 and "".join(deltas) == final.choices[0].text
    assert final.choices[0].text == response_text(tok, teacher, prompts[0], PARAMS)[0]


def test_stop_strings_truncate_and_end_the_row_early(teacher, tok, prompts):
    full, seq = response_text(tok, teacher, prompts[1], PARAMS)
    word = full.split()[3]
    stop = f" {word} "

    async def body(engine):
        streamed, final = "", None
        async for event in engine.stream(GenerationRequest(prompts[1], PARAMS, stop=(stop, "never there"))):
            if isinstance(event, Delta):
                streamed += event.text
            else:
                final = event
        return streamed, final

    streamed, final = run(with_engine(teacher, tok, body))
    choice = final.choices[0]
    assert choice.text == full[: full.index(stop)] == streamed
    assert choice.finish_reason == "stop"
    assert choice.nfe <= seq.nfe


def test_max_tokens_and_n_rows(teacher, tok, prompts):
    async def body(engine):
        capped = await engine.generate(GenerationRequest(prompts[2], PARAMS, max_tokens=5))
        many = await engine.generate(GenerationRequest(prompts[2], D3LLMParams(threshold=0.5, temperature=1.0),
                                                       n=3, seed=7))
        greedy = await engine.generate(GenerationRequest(prompts[2], PARAMS, n=2))
        return capped, many, greedy

    capped, many, greedy = run(with_engine(teacher, tok, body))
    assert len(capped.choices[0].token_ids) == 5 and capped.choices[0].finish_reason == "length"
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert len({c.text for c in many.choices}) > 1  # three seeds, three samples
    assert greedy.choices[0].text == greedy.choices[1].text  # temperature 0: identical


def test_deadline_removes_the_row_and_cancellation_frees_it(teacher, tok, prompts):
    async def body(engine):
        slow = D3LLMParams(threshold=0.0, block_add_threshold=1.0, decoded_token_threshold=1.0, early_stop=False)
        with pytest.raises(EngineTimeout):
            await engine.generate(GenerationRequest(prompts[0], slow, timeout_s=0.05))
        task = asyncio.ensure_future(engine.generate(GenerationRequest(prompts[1], slow)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        ok = await engine.generate(GenerationRequest(prompts[2], PARAMS))
        await asyncio.sleep(0.05)
        return ok, engine.stats, engine.running

    ok, stats, running = run(with_engine(teacher, tok, body))
    assert stats["timeouts"] == 1 and stats["cancelled"] == 1 and running == 0
    assert ok.choices[0].text == response_text(tok, teacher, prompts[2], PARAMS)[0]


def test_a_full_queue_is_refused_at_once(teacher, tok, prompts):
    async def body(engine):
        slow = D3LLMParams(threshold=0.0, block_add_threshold=1.0, decoded_token_threshold=1.0, early_stop=False)
        tasks = [asyncio.ensure_future(engine.generate(GenerationRequest(p, slow))) for p in prompts[:3]]
        await asyncio.sleep(0.02)
        started = asyncio.get_running_loop().time()
        with pytest.raises(EngineOverloaded) as err:
            for p in prompts[3:9]:
                engine.submit(GenerationRequest(p, slow))
        refused_in = asyncio.get_running_loop().time() - started
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return err.value, refused_in

    err, refused_in = run(with_engine(teacher, tok, body, max_batch_size=1, max_queued=2))
    assert refused_in < 1.0 and err.retry_after_s >= 1.0


class Faulty(D3LLMProgram):
    """Fault injection: planning raises for rows whose prompt starts with a marked token."""

    marker = -1

    def plan(self, row, d):
        if row.prompt[1] == self.marker:
            raise RuntimeError("injected planning fault")
        return super().plan(row, d)


def test_a_fault_in_one_request_fails_it_alone(teacher, tok, prompts):
    bad = (prompts[3][0], 99) + prompts[3][2:]
    Faulty.marker = 99

    async def body(engine):
        reqs = [GenerationRequest(p, PARAMS) for p in (prompts[0], bad, prompts[1])]
        results = await asyncio.gather(*(engine.generate(r) for r in reqs), return_exceptions=True)
        later = await engine.generate(GenerationRequest(prompts[2], PARAMS))
        return results, later, engine.alive

    results, later, alive = run(with_engine(teacher, tok, body, program_factory=Faulty))
    assert isinstance(results[1], RequestFailed)
    assert alive
    for p, r in ((prompts[0], results[0]), (prompts[1], results[2]), (prompts[2], later)):
        assert r.choices[0].text == response_text(tok, teacher, p, PARAMS)[0]


def test_a_failing_step_fails_its_rows_and_the_scheduler_goes_on(teacher, tok, prompts, monkeypatch):
    from d3core.samplers.engine import Decoder

    real = Decoder.step
    calls = {"n": 0}

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected device fault")
        return real(self)

    monkeypatch.setattr(Decoder, "step", flaky)

    async def body(engine):
        first = await asyncio.gather(*(engine.generate(GenerationRequest(p, PARAMS)) for p in prompts[:2]),
                                     return_exceptions=True)
        second = await engine.generate(GenerationRequest(prompts[2], PARAMS))
        return first, second

    first, second = run(with_engine(teacher, tok, body))
    assert all(isinstance(r, RequestFailed) for r in first)
    assert second.choices[0].text == response_text(tok, teacher, prompts[2], PARAMS)[0]


def test_zero_token_answers_and_failing_metrics_never_stop_the_scheduler(teacher, tok, prompts):
    class Broken:
        def on_step(self, *a):
            raise ValueError("value must be >0")  # what Ray's Counter.inc(0) raises

        def on_request(self, *a):
            raise ValueError("value must be >0")

    async def body(engine):
        outs = [await engine.generate(GenerationRequest(p, PARAMS, max_tokens=1)) for p in prompts[:3]]
        return outs, engine.alive

    outs, alive = run(with_engine(teacher, tok, body, metrics=Broken()))
    assert alive and all(len(o.choices[0].token_ids) <= 1 for o in outs)


class StepRows:
    """A metrics hook that records the rows of every forward."""

    def __init__(self):
        self.rows = []

    def on_step(self, rows, seconds, tokens):
        self.rows.append(rows)

    def on_request(self, *a):
        pass


@pytest.mark.parametrize("batching", ["request"])
def test_request_level_modes_admit_only_into_an_empty_decoder(teacher, tok, prompts, batching):
    async def body(engine):
        return await asyncio.gather(*(engine.generate(GenerationRequest(p, PARAMS)) for p in prompts[:6]))

    outs = run(with_engine(teacher, tok, body, max_batch_size=4, batching=batching, batch_wait_timeout_s=0.5))
    for p, out in zip(prompts, outs):
        assert out.choices[0].text == response_text(tok, teacher, p, PARAMS)[0]
    # all six are queued within the batch wait; the last two start only after the first four are all done
    first_batch_end = max(o.queue_s + o.decode_s for o in outs[:4])
    assert min(o.queue_s for o in outs[4:]) >= first_batch_end - 0.005


def test_bad_requests_and_settings_name_the_value(teacher, tok):
    async def body(engine):
        with pytest.raises(ValueError, match="prompt 0 is empty"):
            await engine.generate(GenerationRequest((), PARAMS))
        with pytest.raises(ValueError, match="> the model's context"):
            await engine.generate(GenerationRequest(tuple([7] * 120), PARAMS))
        with pytest.raises(ValueError, match="n=9 exceeds"):
            await engine.generate(GenerationRequest((2, 7), PARAMS, n=9))

    run(with_engine(teacher, tok, body, max_batch_size=8))
    with pytest.raises(ValueError, match="max_batch_size=0"):
        ContinuousEngine(teacher, tok, max_batch_size=0)
    with pytest.raises(ValueError, match="sampler='apd'"):
        ContinuousEngine(teacher, tok, sampler="apd")


def test_each_choice_reports_its_token_forwards_per_committed_token(teacher, tok, prompts):
    from serve_apps.responses import usage

    async def body(engine):
        return await asyncio.gather(engine.generate(GenerationRequest(prompts[0], PARAMS)),
                                    engine.generate(GenerationRequest(prompts[1], PARAMS, max_tokens=4)))

    whole, cut = run(with_engine(teacher, tok, body, max_batch_size=4))
    seq = D3LLM.generate(teacher, [list(prompts[0])], PARAMS).sequences[0]
    choice = whole.choices[0]
    assert (choice.tokens_computed, choice.tokens_committed) == (seq.tokens_computed, PARAMS.gen_length)
    assert 0 < cut.choices[0].tokens_committed < PARAMS.gen_length  # left at max_tokens, before its canvas ended
    use = usage(1, 2, 3, 1, whole.tokens_computed, whole.tokens_committed)
    assert use["token_forwards_per_token"] == round(seq.tokens_computed / PARAMS.gen_length, 4)
