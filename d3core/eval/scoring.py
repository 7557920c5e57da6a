"""Answer extraction and scoring for GSM8K and MATH, and code extraction for HumanEval / MBPP.

A response scores only if its final answer is **one** value:

* **Answer statements.** The answer is read from the last answer statement: an answer phrase
  ("The answer is", "#### ", "final answer is", "Answer:"), else the last non-empty
  ``\\boxed{}``, else the last ``**bold**`` span. A statement runs to the end of its sentence;
  "9 * 2 = 18" means its result, 18. Numbers after the statement ("The answer is: 18.
  (16-3-4=9)") do not count.
* **Hedges are wrong.** Two different values joined by "or" ("18 or 19 or 20", ``\\boxed{3} or
  \\boxed{4}``, "It is 3 or 7") or by nothing but a connector ("18, 19", "18/19", "18-20",
  "18 to 20"), or two different answer statements, boxes or bold values in the final answer's
  paragraph (the text since the last blank line before it; an earlier paragraph is a correction).
* **Numbers.** Thousands separators count only in valid groups: "1,000", "$1,000.50" and
  "1 000" (a space, no-break or thin space) are 1000 and 1000.5, but "1,8" or "10,00" is no
  number at all (so "The answer is 1,8" has no answer). Values compare as decimals: "18.00" == 18.
* **Empty boxes** (an echoed "put your final answer within \\boxed{}") are ignored.

GSM8K reports lm-eval's two metrics under their names, each with the rules above:
``strict-match`` reads only the task's own answer phrase ("The answer is" for the CoT zero-shot
prompt, "#### " for the 5-shot one); ``flexible-extract`` reads any answer statement, and
without one the last sentence that has a number (its last number, or the result after its last
"="). MATH-500 compares the final answer (the last non-empty box, else Minerva's "final answer is",
else the last sentence with a number) with the reference through math-verify, in a worker
process with a hard timeout (:mod:`d3core.eval.mathverify`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

STRICT = "strict-match"
FLEXIBLE = "flexible-extract"
GSM8K_METRICS = (STRICT, FLEXIBLE)
COT_PHRASE = re.compile(r"\bthe answer is\b", re.IGNORECASE)  # gsm8k_cot_zeroshot's strict filter
FEWSHOT_PHRASE = re.compile(r"####")  # gsm8k 5-shot's strict filter
ANY_PHRASE = re.compile(r"####|\b(?:the\s+)?(?:final\s+)?answer\s+is\b|\banswer\s*:", re.IGNORECASE)
HUMANEVAL_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")

_SPACES = " \u00a0\u2009\u202f"
_MAX_GROUPS = 5  # space-separated groups of three: up to 10^18, and the regex stays linear
_MAX_ANSWER = 2000  # characters of one box or Minerva answer
_MAX_BOXES = 64  # box openings read, counted from the end
_NUMBER = re.compile(
    r"(?<![\w.,])(?P<sign>[-\u2212])?\$?"
    rf"(?P<int>\d{{1,3}}(?:[{_SPACES}]\d{{3}}){{1,{_MAX_GROUPS}}}(?![\d,])|\d[\d,]*\d|\d)(?P<frac>\.\d+)?(?!\d)"
    r"|(?<![\w.])(?P<bare>\.\d+)")
_VALID_INT = re.compile(rf"\d{{1,3}}(?:,\d{{3}})+|\d{{1,3}}(?:[{_SPACES}]\d{{3}})+|\d+")
_LEAD = re.compile(r"[\s:*$]*")
_SENTENCE_END = re.compile(r"\n|[!?;]|\.(?!\d)")
_HEDGE = re.compile(r"\bor\b", re.IGNORECASE)
# only a connector between two different values: alternatives or a range ("18, 19", "18/19", "18-20", "18 to 20")
_CONNECTOR = re.compile(r"[\s$*]*(?:,|/|\||;|~|-|\u2013|and|to|,\s*and)[\s$*]*", re.IGNORECASE)
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE = re.compile(r"[{}]")
_BOLD = re.compile(r"\*\*([^*\n]+)\*\*")
_MINERVA_PHRASE = re.compile(r"final answer is", re.IGNORECASE)
_MINERVA = re.compile(rf"\s*([^\n]{{1,{_MAX_ANSWER}}}?)(?:\.\s*I hope it is correct|\n|$)", re.IGNORECASE)
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)
_BEGIN_DONE = re.compile(r"\[BEGIN\]\s*(.*?)\s*(?:\[DONE\]|$)", re.DOTALL)


# -- numbers --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Number:
    value: Decimal | None  # None: digits with invalid separators ("1,8")
    start: int
    end: int


def numbers(text: str) -> list[Number]:
    """Every number in ``text`` with its span; invalid groupings come back with ``value=None``."""
    out = []
    for m in _NUMBER.finditer(text):
        if m.group("bare"):
            out.append(Number(Decimal("0" + m.group("bare")), m.start(), m.end()))
            continue
        digits = m.group("int")
        if not _VALID_INT.fullmatch(digits):
            out.append(Number(None, m.start(), m.end()))
            continue
        plain = re.sub(rf"[,{_SPACES}]", "", digits) + (m.group("frac") or "")
        value = Decimal(plain)
        out.append(Number(-value if m.group("sign") else value, m.start(), m.end()))
    return out


def to_number(text: str | None) -> Decimal | None:
    """A single number written as ``text`` ("$1,234.50", "-3", "7."), or None if it is not exactly one."""
    if text is None:
        return None
    found = numbers(text)
    return found[0].value if len(found) == 1 else None


# -- one answer out of a statement ---------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    value: Decimal | None
    how: str  # "phrase", "box", "bold", "last-sentence", "hedged", "invalid", "none"


NO_ANSWER = Answer(None, "none")


def _statement(text: str, start: int) -> str:
    """From ``start`` (past colons, stars, spaces) to the end of that sentence."""
    begin = _LEAD.match(text, start).end()
    end = _SENTENCE_END.search(text, begin)
    return text[begin: end.start() if end else len(text)]


def _sentences(text: str) -> list[str]:
    return re.split(r"\n|(?<=[!?;])|\.(?!\d)", text)


def statement_value(text: str, how: str, pick: str = "first", connectors: bool = True) -> Answer:
    """The one value a statement gives: after its last "=", with hedges and bad numbers refused.

    ``pick``: which number when several different ones are not alternatives ("18 eggs for 2
    days"): the ``first`` (after an answer phrase) or the ``last`` (a plain closing sentence).
    ``connectors``: also refuse values joined only by a comma, slash, dash or "to" (GSM8K's
    answers are single numbers; in MATH "6 - 5i" or "3, 4" is one answer, so only "or" counts).
    """
    if "=" in text:
        text = text.rsplit("=", 1)[1]
    found = numbers(text)
    if any(n.value is None for n in found):
        return Answer(None, "invalid")
    if not found:
        return NO_ANSWER
    for a, b in zip(found, found[1:]):
        joined = _HEDGE.search(text, a.end, b.start) or (connectors and _CONNECTOR.fullmatch(text, a.end, b.start))
        if a.value != b.value and joined:
            return Answer(None, "hedged")
    return Answer((found[0] if pick == "first" else found[-1]).value, how)


@dataclass(frozen=True)
class Box:
    content: str
    start: int
    end: int


def boxes(text: str) -> list[Box]:
    """The last ``\\boxed{...}`` / ``\\fbox{...}`` spans with balanced braces and non-blank content.

    Only the last :data:`_MAX_BOXES` openings are read: the final answer is among them, and a
    hostile text of nested openings then costs linear time.
    """
    out = []
    for m in list(_BOX_OPEN.finditer(text))[-_MAX_BOXES:]:
        depth = 0
        for brace in _BRACE.finditer(text, m.end() - 1, min(len(text), m.end() + _MAX_ANSWER)):
            depth += 1 if brace.group() == "{" else -1
            if depth == 0:
                content = text[m.end(): brace.start()]
                if content.strip():
                    out.append(Box(content, m.start(), brace.end()))
                break
    return out


def last_boxed(text: str) -> str | None:
    """Content of the last non-empty box, or None."""
    found = boxes(text)
    return found[-1].content if found else None


def _paragraph_start(text: str, position: int) -> int:
    """Where the paragraph holding ``position`` begins (just after the last blank line before it)."""
    blank = text.rfind("\n\n", 0, position)
    return blank + 2 if blank >= 0 else 0


def _final_paragraph_boxes(text: str, found: list[Box]) -> list[Box]:
    start = _paragraph_start(text, found[-1].start)
    return [b for b in found if b.start >= start]


def _boxed_answer(text: str) -> Answer:
    found = boxes(text)
    if not found:
        return NO_ANSWER
    values = {statement_value(b.content, "box") for b in _final_paragraph_boxes(text, found)}
    if len(values) > 1:
        return Answer(None, "hedged")
    return values.pop()


def numeric_answer(text: str, phrase: re.Pattern | None = ANY_PHRASE, fallback: bool = True) -> Answer:
    """The final answer of a GSM8K-style response (see the module docstring).

    ``phrase``: the answer phrases to read (``None``: none); ``fallback``: also read boxes, bold
    spans and, failing those, the last sentence with a number.
    """
    if phrase is not None:
        hits = list(phrase.finditer(text))[-_MAX_BOXES:]
        if hits:
            answer = statement_value(_statement(text, hits[-1].end()), "phrase")
            start = _paragraph_start(text, hits[-1].start())
            others = {statement_value(_statement(text, h.end()), "phrase") for h in hits[:-1] if h.start() >= start}
            if answer.value is not None and any(o.value not in (None, answer.value) for o in others):
                return Answer(None, "hedged")  # "The answer is 18. The answer is 19."
            if answer is not NO_ANSWER or not fallback:
                return answer
    if not fallback:
        return NO_ANSWER
    answer = _boxed_answer(text)
    if answer is not NO_ANSWER:
        return answer
    bold = [b for b in list(_BOLD.finditer(text))[-_MAX_BOXES:] if numbers(b.group(1))]
    if bold:
        start = _paragraph_start(text, bold[-1].start())
        values = {statement_value(b.group(1), "bold") for b in bold if b.start() >= start}
        return values.pop() if len(values) == 1 else Answer(None, "hedged")
    sentences = [s for s in _sentences(text) if numbers(s)]
    return statement_value(sentences[-1], "last-sentence", pick="last") if sentences else NO_ANSWER


# -- GSM8K ---------------------------------------------------------------------------------------
def gsm8k_target(target: str) -> Decimal:
    value = to_number(target)
    if value is None:
        raise ValueError(f"GSM8K target {target!r} is not a number: pass the value after '####'")
    return value


def gsm8k_metrics(text: str, target: str, strict_phrase: re.Pattern = COT_PHRASE) -> dict[str, bool]:
    """``{"strict-match": ..., "flexible-extract": ...}`` for one response."""
    want = gsm8k_target(target)
    strict = numeric_answer(text, strict_phrase, fallback=False)
    flexible = numeric_answer(text, ANY_PHRASE, fallback=True)
    return {STRICT: strict.value == want, FLEXIBLE: flexible.value == want}


def score_gsm8k(text: str, target: str, strict_phrase: re.Pattern = COT_PHRASE, metric: str = FLEXIBLE) -> bool:
    if metric not in GSM8K_METRICS:
        raise ValueError(f"metric={metric!r}: must be one of {GSM8K_METRICS}")
    return gsm8k_metrics(text, target, strict_phrase)[metric]


# -- MATH ----------------------------------------------------------------------------------------
def math_answers(text: str) -> list[str]:
    """LaTeX of the final answer, and of any other answers given beside it; [] for none or a hedge.

    The final answer is the last non-empty box, else Minerva's "final answer is ...", else the
    last sentence with a number. Other boxes in the final box's paragraph come first in the list:
    they must all equal the final one (``\\boxed{15\\frac{39}{40}}`` or ``\\boxed{\\frac{639}{40}}``
    is one value, ``\\boxed{3}`` or ``\\boxed{4}`` a hedge). Alternatives joined by "or" outside
    boxes are a hedge too.
    """
    found = boxes(text)
    if found:
        final = list(dict.fromkeys(re.sub(r"\s+", "", b.content) for b in _final_paragraph_boxes(text, found)))
        return [f"$\\boxed{{{content}}}$" for content in final]
    phrases = list(_MINERVA_PHRASE.finditer(text))
    minerva = _MINERVA.match(text, phrases[-1].end()) if phrases else None
    if minerva:
        answer = minerva.group(1).strip().strip("$").strip()
        return [] if statement_value(answer, "phrase", connectors=False).how == "hedged" else [f"${answer}$"]
    sentences = [s for s in _sentences(text) if numbers(s)]
    if not sentences or statement_value(sentences[-1], "last-sentence", connectors=False).how == "hedged":
        return []
    return [sentences[-1]]


def extract_math(text: str) -> str | None:
    """LaTeX of the final answer (see :func:`math_answers`), or None if there is none."""
    answers = math_answers(text)
    return answers[-1] if answers else None


def score_math(text: str, target: str) -> bool:
    """Whether the response's final answer is one value and equals ``target`` (LaTeX) under math-verify."""
    from d3core.eval import mathverify

    answers = math_answers(text)
    if not answers:
        return False
    verifier = mathverify.shared()
    if not all(verifier.verify(answers[-1], other) is True for other in answers[:-1]):
        return False  # different values side by side: a hedge
    return verifier.verify(f"$\\boxed{{{target}}}$", answers[-1]) is True


# -- code (HumanEval, MBPP) ---------------------------------------------------------------------
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
