"""The benchmarks' legacy engine (the app's batching from before the step engine) keeps its old policy."""

from __future__ import annotations

import asyncio

import pytest
from benchmark_module import load_benchmark

from d3core.eval import synthetic
from d3core.samplers import get_sampler
from d3core.samplers.d3llm import D3LLMParams
from d3core.sft import encode_prompt
from serve_apps.batching import ContinuousEngine
from serve_apps.requests import GenerationRequest

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PARAMS = D3LLMParams(threshold=0.5, cache_delay_iter=2)


@pytest.fixture(scope="module")
def prompts(tok):
    return [tuple(encode_prompt(tok, p.question)) for p in synthetic.generate("test", 6, seed=5)]


class StepRows:
    def __init__(self) -> None:
        self.rows: list[int] = []

    def on_step(self, rows: int, seconds: float, tokens: int) -> None:
        self.rows.append(rows)

    def on_request(self, *a):
        pass


def serve(engine_cls, teacher, tok, body, **kw):
    async def main():
        engine = engine_cls(teacher, tok, **kw)
        try:
            return await body(engine)
        finally:
            await engine.close()

    return asyncio.run(main())


def answer(tok, teacher, prompt, params) -> str:
    seq = get_sampler("d3llm").generate(teacher, [list(prompt)], params).sequences[0]
    return tok.decode(seq.response_ids, skip_special_tokens=True)


def test_legacy_batches_share_one_parameter_set(teacher, tok, prompts):
    legacy = load_benchmark("legacy_engine").LegacyEngine
    other = D3LLMParams(threshold=0.9, cache_delay_iter=2)

    async def body(engine):
        reqs = [GenerationRequest(p, PARAMS if i % 2 else other) for i, p in enumerate(prompts)]
        return await asyncio.gather(*(engine.generate(r) for r in reqs))

    for engine_cls, most in ((legacy, 3), (ContinuousEngine, 6)):
        meter = StepRows()
        outs = serve(engine_cls, teacher, tok, body, max_batch_size=8, batching="request", metrics=meter,
                     batch_wait_timeout_s=0.5)
        assert max(meter.rows) == most  # request-level on the step engine mixes them; legacy never did
        for i, (p, out) in enumerate(zip(prompts, outs)):
            assert out.choices[0].text == answer(tok, teacher, p, PARAMS if i % 2 else other)


def test_legacy_rows_decode_past_max_tokens_and_cut_the_text_after(teacher, tok, prompts):
    legacy = load_benchmark("legacy_engine").LegacyEngine

    async def body(engine):
        return await engine.generate(GenerationRequest(prompts[3], PARAMS, max_tokens=2))

    old = serve(legacy, teacher, tok, body).choices[0]
    step = serve(ContinuousEngine, teacher, tok, body).choices[0]
    seq = get_sampler("d3llm").generate(teacher, [list(prompts[3])], PARAMS).sequences[0]
    assert old.token_ids == step.token_ids == tuple(seq.response_ids[:2])
    assert old.finish_reason == step.finish_reason == "length"
    assert old.nfe == seq.nfe > step.nfe  # the old engine decoded the whole canvas; the step engine stops
