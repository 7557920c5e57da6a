"""Answer extraction and scoring: numeric exact match, math equivalence, code assembly.

* GSM8K: the number after the format's answer phrase ("The answer is N" for the CoT
  zero-shot prompt, "#### N" for the 5-shot one), else the last number in the text
  (lm-eval's strict and flexible filters); compared as numbers, so "1,000" == "1000.00".
* MATH-500: the last ``\\boxed{...}`` (else Minerva's "final answer is ..."), judged against the
  reference with ``math-verify`` (symbolic equivalence via SymPy).
* HumanEval / MBPP: the program to run is assembled here from the model's text (fenced
  ``python`` block, MBPP ``[BEGIN] ... [DONE]``, or a raw continuation of the prompt) and the
  benchmark's tests; :mod:`d3core.eval.sandbox` runs it.
"""

from __future__ import annotations

import logging
import re
import threading
from decimal import Decimal, InvalidOperation

logger = logging.getLogger(__name__)

GSM8K_COT_STRICT = re.compile(r"The answer is \$?(-?[0-9.,]+)", re.IGNORECASE)
GSM8K_FEWSHOT_STRICT = re.compile(r"#### \$?(-?[0-9.,]+)")
_NUMBER = re.compile(r"-?\$?[0-9][0-9,]*(?:\.[0-9]+)?|-?\.[0-9]+")
_MINERVA = re.compile(r"final answer is\s*(.+?)(?:\.\s*I hope it is correct|\n|$)", re.IGNORECASE)
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)
_BEGIN_DONE = re.compile(r"\[BEGIN\]\s*(.*?)\s*(?:\[DONE\]|$)", re.DOTALL)
HUMANEVAL_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


# -- numbers (GSM8K) --------------------------------------------------------------------------
def to_number(text: str | None) -> Decimal | None:
    """A GSM8K-style number ("$1,234.50", "7.") as a Decimal, or None if it is not one."""
    if text is None:
        return None
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def extract_gsm8k(text: str, strict: re.Pattern | None = GSM8K_COT_STRICT) -> str | None:
    """The answer phrase's number if ``strict`` matches (last match), else the last number in the text."""
    if strict is not None:
        found = strict.findall(text)
        if found:
            return found[-1].rstrip(".")
    numbers = _NUMBER.findall(text)
    return numbers[-1].rstrip(".") if numbers else None


def score_gsm8k(text: str, target: str, strict: re.Pattern | None = GSM8K_COT_STRICT) -> bool:
    got, want = to_number(extract_gsm8k(text, strict)), to_number(target)
    if want is None:
        raise ValueError(f"GSM8K target {target!r} is not a number: pass the value after '####'")
    return got is not None and got == want


# -- math (MATH-500) --------------------------------------------------------------------------
def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` with balanced braces, or None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1: j]
    return None


def extract_math(text: str) -> str:
    """LaTeX of the final answer: the last box, Minerva's "final answer is", else the whole text."""
    boxed = last_boxed(text)
    if boxed is not None:
        return f"$\\boxed{{{boxed}}}$"
    minerva = _MINERVA.findall(text)
    if minerva:
        answer = minerva[-1].strip().strip("$").strip()
        return f"${answer}$"
    return text


def _math_timeout() -> int | None:
    # math-verify enforces its timeout with SIGALRM, which only the main thread may set.
    return 5 if threading.current_thread() is threading.main_thread() else None


def score_math(text: str, target: str) -> bool:
    """Whether the response's final answer equals ``target`` (LaTeX) under math-verify."""
    from math_verify import parse, verify

    timeout = _math_timeout()
    gold = parse(f"$\\boxed{{{target}}}$", parsing_timeout=timeout)
    pred = parse(extract_math(text), parsing_timeout=timeout)
    if not gold:
        logger.warning("math-verify could not parse the reference answer %r: scored as wrong", target)
        return False
    return bool(pred) and bool(verify(gold, pred, timeout_seconds=timeout))


# -- code (HumanEval, MBPP) --------------------------------------------------------------------
def extract_code(text: str) -> str:
    """The first fenced code block, else an MBPP ``[BEGIN] ... [DONE]`` span, else the text up to any ``[DONE]``."""
    fenced = _FENCE.search(text)
    if fenced:
        return fenced.group(1)
    span = _BEGIN_DONE.search(text)
    if span:
        return span.group(1)
    return text.split("[DONE]", 1)[0]


def truncate_completion(text: str, stops=HUMANEVAL_STOPS) -> str:
    """A raw HumanEval continuation cut at the first top-level stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def _prompt_header(prompt: str) -> str:
    """The import lines of a HumanEval prompt (kept when the model rewrites the whole function)."""
    return "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))


def humaneval_program(prompt: str, test: str, entry_point: str, response: str, instruct: bool) -> str:
    """The program that checks one HumanEval response.

    ``instruct``: the response is chat text with the code in a block; if the block defines the
    entry point it is used whole (after the prompt's imports), else it continues the prompt.
    Otherwise the response is a raw continuation of the prompt, cut at stop sequences.
    """
    if instruct:
        code = extract_code(response)
        defines = re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE)
        body = f"{_prompt_header(prompt)}\n{code}" if defines else prompt + code
    else:
        body = prompt + truncate_completion(response)
    return f"{body}\n\n{test}\n\ncheck({entry_point})\n"


def mbpp_program(code: str, tests: list[str], setup: str = "") -> str:
    """The candidate solution, then the task's setup code (it may use the solution's classes), then its asserts."""
    return "\n".join([code, "", setup, "", *tests, ""])
