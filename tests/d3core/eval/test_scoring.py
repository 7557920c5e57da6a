"""Scorers on gold data: every reference answer, written as a model would write it, scores correct."""

from __future__ import annotations

import re

import pytest

from d3core.eval import benchmarks, scoring

CALC = re.compile(r"<<[^>]*>>")


def as_cot_response(solution: str) -> str:
    """A GSM8K worked solution in the CoT zero-shot style: calculator notes dropped, 'The answer is N.'"""
    body, final = solution.rsplit("####", 1)
    return CALC.sub("", body).strip() + f" The answer is {final.strip()}."


@pytest.fixture(scope="module")
def gsm8k():
    return benchmarks.gsm8k()


@pytest.fixture(scope="module")
def math500():
    return benchmarks.math500()


def test_gsm8k_every_reference_scores_in_both_formats(gsm8k):
    assert len(gsm8k) == 1319
    for e in gsm8k:
        assert scoring.score_gsm8k(as_cot_response(e.meta["solution"]), e.target, scoring.GSM8K_COT_STRICT), e.id
        assert scoring.score_gsm8k(e.meta["solution"], e.target, scoring.GSM8K_FEWSHOT_STRICT), e.id


def test_gsm8k_other_problems_answers_score_wrong(gsm8k):
    wrong = 0
    for e, other in zip(gsm8k, gsm8k[1:] + gsm8k[:1]):
        if scoring.to_number(e.target) != scoring.to_number(other.target):
            assert not scoring.score_gsm8k(as_cot_response(other.meta["solution"]), e.target), e.id
            wrong += 1
    assert wrong > 1200


def test_gsm8k_extraction_rules():
    assert scoring.extract_gsm8k("3 + 4 = 7. The answer is 7. Check: 10 apples") == "7"  # strict phrase wins
    assert scoring.extract_gsm8k("3 + 4 = 7 and then 1,200 more") == "1,200"  # flexible: last number
    assert scoring.score_gsm8k("The answer is $1,000.00.", "1000")
    assert not scoring.score_gsm8k("no number here", "5")
    assert scoring.score_gsm8k("so #### -3", "-3", scoring.GSM8K_FEWSHOT_STRICT)


def test_math500_every_reference_solution_scores(math500):
    assert len(math500) == 500
    for e in math500:
        assert scoring.score_math(e.meta["solution"], e.target), e.id  # the worked solution ends in \boxed{}


def test_math500_answers_in_model_phrasings(math500):
    for e in math500[::5]:
        assert scoring.score_math(f"Let's think.\nFinal Answer: The final answer is ${e.target}$. I hope it is "
                                  "correct.", e.target), e.id
        assert scoring.score_math(f"So the answer is $\\boxed{{{e.target}}}$.", e.target), e.id


def test_math500_wrong_answers_score_wrong(math500):
    checked = 0
    for e, other in zip(math500[::5], math500[1::5]):
        if e.target.replace(" ", "") != other.target.replace(" ", ""):
            checked += 1
            assert not scoring.score_math(f"\\boxed{{{other.target}}}", e.target), (e.id, other.target)
    assert checked > 90


def test_math_equivalence_is_symbolic():
    assert scoring.score_math("the result is $\\boxed{\\dfrac{1}{2}}$", "\\frac12")
    assert scoring.score_math("\\boxed{0.5}", "\\frac{1}{2}")
    assert not scoring.score_math("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}")
    assert not scoring.score_math("I do not know", "7")


def test_last_boxed_handles_nesting():
    assert scoring.last_boxed("a \\boxed{1} then \\boxed{\\frac{a}{b^{2}}} end") == "\\frac{a}{b^{2}}"
    assert scoring.last_boxed("no box") is None
    assert scoring.last_boxed("\\boxed{unclosed") is None


def test_code_extraction():
    text = "Here you go:\n```python\ndef f(x):\n    return x\n```\nDone."
    assert scoring.extract_code(text) == "def f(x):\n    return x\n"
    assert scoring.extract_code("[BEGIN]\ndef g():\n    pass\n[DONE]") == "def g():\n    pass"
    assert scoring.extract_code("```python\ndef h():\n    return 1") == "def h():\n    return 1"  # unterminated
    assert scoring.truncate_completion("    return x\n\ndef extra():\n    pass") == "    return x\n"


def test_humaneval_program_instruct_and_raw():
    prompt = "import math\n\ndef f(x):\n    \"\"\"doc\"\"\"\n"
    test = "def check(c):\n    assert c(4) == 2.0\n"
    whole = "```python\ndef f(x):\n    return math.sqrt(x)\n```"
    prog = scoring.humaneval_program(prompt, test, "f", whole, instruct=True)
    assert prog.startswith("import math\ndef f(x):") and prog.rstrip().endswith("check(f)")
    body_only = "```python\n    return math.sqrt(x)\n```"
    assert scoring.humaneval_program(prompt, test, "f", body_only, instruct=True).startswith(prompt)
    raw = scoring.humaneval_program(prompt, test, "f", "    return math.sqrt(x)\nprint(1)", instruct=False)
    assert "print(1)" not in raw and "return math.sqrt(x)" in raw
