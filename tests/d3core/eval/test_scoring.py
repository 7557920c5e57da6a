"""Scorers on gold data and on the loopholes of issue 16: one final value or nothing."""

from __future__ import annotations

import re
import threading
import time

import pytest

from d3core.eval import benchmarks, mathverify, scoring
from d3core.eval.codechecks import humaneval_source
from d3core.eval.tasks import get_task

CALC = re.compile(r"<<[^>]*>>")
S, F = scoring.STRICT, scoring.FLEXIBLE


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


# -- GSM8K on gold data --------------------------------------------------------------------------------
def test_gsm8k_every_reference_scores_in_both_formats_and_metrics(gsm8k):
    assert len(gsm8k) == 1319
    for e in gsm8k:
        assert scoring.gsm8k_metrics(as_cot_response(e.meta["solution"]), e.target) == {S: True, F: True}, e.id
        few = scoring.gsm8k_metrics(e.meta["solution"], e.target, scoring.FEWSHOT_PHRASE)
        assert few == {S: True, F: True}, e.id


def test_gsm8k_other_problems_answers_score_wrong(gsm8k):
    wrong = 0
    for e, other in zip(gsm8k, gsm8k[1:] + gsm8k[:1]):
        if scoring.to_number(e.target) != scoring.to_number(other.target):
            assert not any(scoring.gsm8k_metrics(as_cot_response(other.meta["solution"]), e.target).values()), e.id
            wrong += 1
    assert wrong > 1200


# -- the cases of issue 16 on a real item (gsm8k/0, Janet's ducks: 18) ---------------------------------
HEDGES = ["The answer is 18 or 19 or 20.", "So it is either 18 or 19.", "The answer is 18, 19, 20.",
          "The answer is 18/19.", "The answer is 17 to 19.", "**18** or **19**", "\\boxed{18} or \\boxed{19}",
          "\\boxed{18}\n\\boxed{19}", "\\boxed{19}\n\\boxed{18}", "The answer is 18. The answer is 19.",
          "The answer is 19.\nThe answer is 18.",
          "\\boxed{19} or \\boxed{18}", "It is 18 or 7", "It is 7 or 18", "The answer is 1,8.", "The answer is 18,0"]


@pytest.mark.parametrize("text", HEDGES)
def test_gsm8k_hedges_and_bad_separators_score_wrong(gsm8k, text):
    assert gsm8k[0].target == "18"
    assert scoring.gsm8k_metrics(text, "18") == {S: False, F: False}


def test_gsm8k_fewshot_hedge_is_wrong():
    assert scoring.gsm8k_metrics("#### 18 or 19", "18", scoring.FEWSHOT_PHRASE) == {S: False, F: False}
    assert scoring.gsm8k_metrics("#### 18 or 19", "19", scoring.FEWSHOT_PHRASE) == {S: False, F: False}


RIGHT = [  # (response, strict-match, flexible-extract) for target 18
    ("The answer is: 18. (16-3-4=9)", True, True),  # the answer statement wins over later arithmetic
    ("The answer is 18. Check: 16 - 3 - 4 = 9 eggs, 9 * 2 = 18, and 3 + 4 = 7.", True, True),
    ("Janet makes **18** dollars a day. She had 16 eggs, ate 3 and baked 4.", False, True),
    ("She sells 16 - 3 - 4 = 9 eggs, so she makes 9 * 2 = 18", False, True),
    ("The answer is 9 * 2 = 18.", True, True),
    ("The answer is $18.00.", True, True),
    ("The answer is 18 dollars for 9 eggs.", True, True),
    ("Please put your final answer within \\boxed{}.\nShe sells 9 eggs for $2 each: 9 * 2 = $18.", False, True),
    ("Put the final answer in \\boxed{}: \\boxed{18}", False, True),
    ("The answer is 18 dollars. The answer is 18.", True, True),
    ("The answer is 19.\n\nWait, 16 - 3 - 4 = 9 and 9 * 2 = 18. The answer is 18.", True, True),  # a correction
]


@pytest.mark.parametrize("text,strict,flexible", RIGHT)
def test_gsm8k_right_answers_score_right(text, strict, flexible):
    assert scoring.gsm8k_metrics(text, "18") == {S: strict, F: flexible}


def test_thousands_separators_only_in_valid_groups():
    assert [n.value for n in scoring.numbers("1,000 and $1,000.50 and 12,345,678")] == [1000, scoring.Decimal(
        "1000.50"), 12345678]
    for text in ("1 000", "1\u00a0000", "1\u2009000"):
        assert scoring.to_number(text) == 1000, text
    for text in ("1,8", "10,00", "1,0000", "1,00,000"):
        assert scoring.numbers(text)[0].value is None, text  # not a number at all
    assert scoring.gsm8k_metrics("The answer is 1 000.", "1000") == {S: True, F: True}
    assert scoring.gsm8k_metrics("The answer is 1,000.", "1000") == {S: True, F: True}
    assert scoring.gsm8k_metrics("so she has 1 000 eggs", "1000")[F]
    assert not any(scoring.gsm8k_metrics("The answer is 10,00.", "1000").values())
    assert scoring.gsm8k_metrics("16-3 = 13, then = -3", "-3")[F]  # a minus sign, not the dash in 16-3


def test_gsm8k_reports_both_lm_eval_metrics_under_their_names(gsm8k):
    task = get_task("gsm8k")
    assert task.metric_names == ("flexible-extract", "strict-match")
    texts = ["The answer is 18.", "She makes 9 * 2 = 18", "It is 18 or 19"]
    per = task.metrics(texts, [gsm8k[0]] * 3, "raw")
    assert per == {"strict-match": [True, False, False], "flexible-extract": [True, True, False]}
    assert task.score(texts, [gsm8k[0]] * 3, "raw") == per["flexible-extract"]
    long = get_task("long_gsm8k")
    assert long.metrics(["so #### 18", "The answer is 18."], [gsm8k[0]] * 2, "raw") == {
        "flexible-extract": [True, True], "strict-match": [True, False]}


# -- MATH ----------------------------------------------------------------------------------------------
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


def test_math_hedges_wrong_and_equal_alternatives_right(math500):
    nine = next(e for e in math500 if e.target == "9")  # a real item with a one-number answer
    assert scoring.score_math("\\boxed{9}", nine.target)
    for text in ("\\boxed{9} or \\boxed{4}", "\\boxed{4} or \\boxed{9}", "It is 9 or 7", "It is 7 or 9",
                 "The final answer is $9$ or $4$. I hope it is correct.", "\\boxed{9 \\text{ or } 4}",
                 "\\boxed{4}\n\\boxed{9}", "\\boxed{9}\nor\n\\boxed{4}"):
        assert not scoring.score_math(text, nine.target), text
    assert scoring.score_math("$= \\boxed{4\\frac{1}{2}}$, or $\\boxed{\\frac{9}{2}}$", "\\frac92")
    assert scoring.score_math("first \\boxed{4}.\n\nOn second thought it is \\boxed{9}.", nine.target)


def test_an_empty_box_is_ignored(math500):
    nine = next(e for e in math500 if e.target == "9")
    echoed = "So the answer is \\boxed{9}.\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert scoring.last_boxed(echoed) == "9" and scoring.score_math(echoed, nine.target)
    assert scoring.score_math("Put your final answer within \\boxed{ }. The final answer is $9$. I hope it is "
                              "correct.", nine.target)


def test_math_equivalence_is_symbolic():
    assert scoring.score_math("the result is $\\boxed{\\dfrac{1}{2}}$", "\\frac12")
    assert scoring.score_math("\\boxed{0.5}", "\\frac{1}{2}")
    assert scoring.score_math("The final answer is $6 - 5i$. I hope it is correct.", "6 - 5i")
    assert not scoring.score_math("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}")
    assert not scoring.score_math("I do not know", "7")


def test_math_verify_has_a_hard_timeout_on_and_off_the_main_thread():
    bomb = "\\boxed{9^{9^{9}}}"
    t0 = time.monotonic()
    assert scoring.score_math(bomb, "9") is False
    assert time.monotonic() - t0 < mathverify.TIMEOUT_S + 5
    out: list = []
    worker = threading.Thread(target=lambda: out.append(scoring.score_math(bomb, "9")))
    t0 = time.monotonic()
    worker.start()
    worker.join(mathverify.TIMEOUT_S + 30)
    assert not worker.is_alive() and out == [False] and time.monotonic() - t0 < mathverify.TIMEOUT_S + 5
    assert scoring.score_math("\\boxed{9}", "9")  # the verifier still works afterwards


def test_a_hung_comparison_is_killed_and_the_worker_restarts():
    verifier = mathverify.MathVerifier(timeout_s=1.0)
    try:
        assert verifier.verify("$\\boxed{2}$", "$\\boxed{2}$") is True
        t0 = time.monotonic()
        assert verifier.verify("$\\boxed{2}$", "$\\boxed{9^{9^{9^{9}}}}$") is None  # killed at the timeout
        assert time.monotonic() - t0 < 5 and verifier.timeouts == 1
        assert verifier.verify("$\\boxed{3}$", "$\\boxed{3}$") is True
    finally:
        verifier.close()
    with pytest.raises(ValueError, match="timeout_s"):
        mathverify.MathVerifier(timeout_s=0)


def test_last_boxed_handles_nesting():
    assert scoring.last_boxed("a \\boxed{1} then \\boxed{\\frac{a}{b^{2}}} end") == "\\frac{a}{b^{2}}"
    assert scoring.last_boxed("no box") is None
    assert scoring.last_boxed("\\boxed{unclosed") is None


def test_hostile_texts_are_scored_in_linear_time():
    t0 = time.monotonic()
    for text in ("123 " * 50_000, "\\boxed{" * 20_000, "final answer is " * 20_000, "1," * 100_000,
                 "**1**" * 40_000, "The answer is " * 30_000):
        scoring.gsm8k_metrics(text, "1")
        scoring.math_answers(text)
    assert time.monotonic() - t0 < 20


# -- code ----------------------------------------------------------------------------------------------
def test_code_extraction():
    text = "Here you go:\n```python\ndef f(x):\n    return x\n```\nDone."
    assert scoring.extract_code(text) == "def f(x):\n    return x\n"
    assert scoring.extract_code("[BEGIN]\ndef g():\n    pass\n[DONE]") == "def g():\n    pass"
    assert scoring.extract_code("```python\ndef h():\n    return 1") == "def h():\n    return 1"  # unterminated
    assert scoring.truncate_completion("    return x\n\ndef extra():\n    pass") == "    return x\n"


def test_humaneval_source_instruct_and_raw():
    prompt = "import math\n\ndef f(x):\n    \"\"\"doc\"\"\"\n"
    whole = "```python\ndef f(x):\n    return math.sqrt(x)\n```"
    assert humaneval_source(prompt, "f", whole, instruct=True) == "import math\ndef f(x):\n    return math.sqrt(x)\n"
    body_only = "```python\n    return math.sqrt(x)\n```"
    assert humaneval_source(prompt, "f", body_only, instruct=True).startswith(prompt)
    raw = humaneval_source(prompt, "f", "    return math.sqrt(x)\nprint(1)", instruct=False)
    assert "print(1)" not in raw and "return math.sqrt(x)" in raw
