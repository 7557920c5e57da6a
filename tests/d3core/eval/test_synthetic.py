"""The synthetic task: splits, determinism, consistent chains of thought, multimodality, scoring."""

from __future__ import annotations

import re

import pytest

from d3core.eval import synthetic
from d3core.models.tiny_tokenizer import UNK_ID, build_tokenizer
from d3core.sft import encode_prompt, encode_response


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_splits_are_disjoint_and_deterministic():
    test = synthetic.generate("test", 500, seed=0)
    train = synthetic.generate("train", 5000, seed=0)
    keys = lambda ps: {(p.start, p.ops) for p in ps}  # noqa: E731
    assert not keys(test) & keys(train)
    assert [p.question for p in synthetic.generate("test", 50, seed=0)] == [p.question for p in test[:50]]
    assert len({p.id for p in test}) == 500
    stream = synthetic.TrainStream(seed=0)
    assert all(synthetic.split_of(p.start, p.ops) == "train" for p in (next(stream) for _ in range(500)))


def test_every_chain_of_thought_is_correct_arithmetic():
    for p in synthetic.generate("train", 2000, seed=1):
        for a, op, b, c in re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", p.answer):
            a, b, c = int(a), int(b), int(c)
            assert c == (a + b if op == "+" else a - b if op == "-" else a * b), p.answer
        assert synthetic.score(p.answer, p.target)


def test_answers_are_multimodal():
    problems = synthetic.generate("train", 3000, seed=2)
    assert sum(" add " in f" {p.answer}" or "take " in p.answer for p in problems) > 200  # grouped mode
    assert len({p.answer.split()[0] for p in problems}) >= 3  # openers and first operands vary
    import random

    rng = random.Random(0)
    orders = {synthetic._sequential_steps(rng, 5, (("+", 3),))[0] for _ in range(50)}
    assert orders == {"5 + 3 = 8 .", "3 + 5 = 8 ."}


def test_tokenization_fits_the_tiny_layout(tok):
    for p in synthetic.generate("test", 500, seed=0):
        prompt, resp = encode_prompt(tok, p.question), encode_response(tok, p.answer)
        assert UNK_ID not in prompt and UNK_ID not in resp
        assert len(resp) < 48 and len(prompt) + 48 <= 128
        assert tok.decode(resp) == p.answer


def test_extraction_and_scoring():
    assert synthetic.extract_answer("3 + 4 = 7 . so the answer is 7") == 7
    assert synthetic.extract_answer("no number") is None
    assert not synthetic.score("#### 12", 13)
    with pytest.raises(ValueError, match="split='dev'"):
        synthetic.generate("dev", 3)
