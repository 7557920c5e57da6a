"""The decode engine reproduces the golden fixture recorded before its rewrite (see golden.py)."""

from __future__ import annotations

import gzip
import json

import pytest

import golden

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def fixture():
    with gzip.open(golden.FIXTURE, "rt") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def models():
    from d3core.models.shipped import load_tiny_ar, load_tiny_teacher

    return {"teacher": load_tiny_teacher(), "ar": load_tiny_ar(), "dream": golden.sharp_dream()}


@pytest.mark.parametrize("name,kwargs", golden.CONFIGS, ids=[golden.config_key(n, k) for n, k in golden.CONFIGS])
def test_engine_reproduces_the_golden_fixture(name, kwargs, fixture, models, tok):
    prompts = fixture["prompts"]
    assert prompts == golden.held_out_prompts(tok)
    key = golden.config_key(name, kwargs)
    model = models["ar"] if name == "ar" else models["teacher"]
    want = fixture["teacher"][key]
    assert golden.check_rows(name, kwargs, model, models["ar"], prompts, 8, want["batch8"]) == []
    assert golden.check_rows(name, kwargs, model, models["ar"], prompts, 1, want["batch1"]) == []
    if name != "ar":
        dream = fixture["dream"][key]["batch8"]
        assert golden.check_rows(name, kwargs, models["dream"], models["ar"], prompts[:golden.N_DREAM], 8, dream) == []


SEGMENT_CONFIGS = [(n, k) for n, k in golden.CONFIGS if n not in ("apd", "ar")]


@pytest.mark.parametrize("name,kwargs", SEGMENT_CONFIGS, ids=[golden.config_key(n, k) for n, k in SEGMENT_CONFIGS])
def test_bucketed_steps_reproduce_the_golden_fixture(name, kwargs, fixture, models, monkeypatch):
    """The padded step shapes that CUDA graphs capture give the same tokens, run eagerly on the CPU."""
    from d3core.samplers import engine

    real = engine.Decoder.__init__

    def bucketed(self, *args, **kw):
        real(self, *args, **dict(kw, buckets=True))
        assert self.buckets

    monkeypatch.setattr(engine.Decoder, "__init__", bucketed)
    prompts = fixture["prompts"]
    key = golden.config_key(name, kwargs)
    assert golden.check_rows(name, kwargs, models["teacher"], models["ar"], prompts, 8,
                             fixture["teacher"][key]["batch8"]) == []
    assert golden.check_rows(name, kwargs, models["dream"], models["ar"], prompts[:golden.N_DREAM], 8,
                             fixture["dream"][key]["batch8"]) == []


def test_a_changed_commit_is_not_taken_for_a_near_tie(fixture, models):
    """The near-tie allowance cannot hide a real difference: a recorded row with one token or one
    commit step changed fails the check."""
    name, kwargs = golden.CONFIGS[0]
    want = fixture["teacher"][golden.config_key(name, kwargs)]["batch1"][:2]
    prompts = fixture["prompts"][:2]
    assert golden.check_rows(name, kwargs, models["teacher"], models["ar"], prompts, 1, want) == []
    token = [dict(want[0], tokens=[(want[0]["tokens"][0] + 1) % 100 + 6] + want[0]["tokens"][1:]), want[1]]
    steps = list(want[1]["unmask_step"])
    steps[0], steps[-1] = steps[-1], steps[0]
    step = [want[0], dict(want[1], unmask_step=steps)]
    for changed in (token, step):
        bad = golden.check_rows(name, kwargs, models["teacher"], models["ar"], prompts, 1, changed)
        assert len(bad) == 1 and "not a float near-tie" in bad[0], bad
