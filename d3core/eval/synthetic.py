"""The embedded synthetic task: GSM8K-shaped multi-step arithmetic with chain-of-thought.

A problem is a start amount and 2-4 operations (buy/find/get adds, give/lose/sell
subtracts, double/triple multiplies), told as a short story::

    ann has 7 apples . then she buys 5 more . she loses 3 . how many apples now ?

and answered with a chain of thought whose later tokens depend on earlier ones::

    start 7 . 7 + 5 = 12 . 12 - 3 = 9 . so the answer is 9

The answer distribution is genuinely multimodal, as natural text is: an optional opener,
either operand order for ``+`` and ``*``, and for problems without a multiplication a
*grouped* solution that first totals the additions and the subtractions. A decoder that
commits many positions at once from independent marginals can mix modes and break the
arithmetic, which is the accuracy-for-parallelism trade the project measures.

Splits are disjoint by construction: a problem's arithmetic key (start amount and
operation list, ignoring names and wording) hashes into the test split or the train split.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from d3core.models.tiny_tokenizer import ITEMS, MAX_NUMBER, NAMES

MAX_VALUE = 60
MIN_OPS, MAX_OPS = 2, 4
TEST_BUCKETS = 10  # one bucket in TEST_BUCKETS of the problem space is test-only
SPLITS = ("train", "test")

ADD_VERBS = ("buys {k} more", "finds {k} more", "gets {k} more")
SUB_VERBS = ("gives away {k}", "loses {k}", "sells {k}")
MUL_VERBS = {2: "doubles the {item}", 3: "triples the {item}"}
OPENERS = ("", "start {a} .", "we have {a} .")
CLOSERS = ("answer {y}", "so the answer is {y}", "#### {y}")


@dataclass(frozen=True)
class Problem:
    """One synthetic problem; ``answer`` is one sampled chain of thought, ``target`` the number."""

    id: str
    question: str
    answer: str
    target: int
    start: int
    ops: tuple[tuple[str, int], ...]


def _key(start: int, ops: tuple[tuple[str, int], ...]) -> str:
    return f"{start}|" + ",".join(f"{op}{k}" for op, k in ops)


def split_of(start: int, ops: tuple[tuple[str, int], ...]) -> str:
    digest = hashlib.sha256(_key(start, ops).encode()).digest()
    return "test" if digest[0] % TEST_BUCKETS == 0 else "train"


def _apply(op: str, x: int, k: int) -> int:
    return x + k if op == "+" else x - k if op == "-" else x * k


def _sample_arithmetic(rng: random.Random) -> tuple[int, tuple[tuple[str, int], ...]]:
    while True:
        x = start = rng.randint(2, 20)
        ops = []
        for _ in range(rng.randint(MIN_OPS, MAX_OPS)):
            op = rng.choices(("+", "-", "*"), weights=(4, 4, 1))[0]
            k = rng.randint(2, 3) if op == "*" else rng.randint(1, 9)
            y = _apply(op, x, k)
            if not 0 <= y <= MAX_VALUE:
                break
            ops.append((op, k))
            x = y
        else:
            return start, tuple(ops)


def _sequential_steps(rng: random.Random, start: int, ops) -> list[str]:
    steps, x = [], start
    for op, k in ops:
        y = _apply(op, x, k)
        swap = op != "-" and rng.random() < 0.3
        left, right = (k, x) if swap else (x, k)
        steps.append(f"{left} {op} {right} = {y} .")
        x = y
    return steps


def _chain(rng: random.Random, word: str, values: list[int]) -> tuple[list[str], int]:
    """'add 3 + 4 = 7 . 7 + 2 = 9 .' totals ``values`` one addition at a time."""
    steps, total = [], values[0]
    for i, v in enumerate(values[1:]):
        new = total + v
        steps.append(f"{word + ' ' if i == 0 else ''}{total} + {v} = {new} .")
        total = new
    return steps, total


def _grouped_steps(rng: random.Random, start: int, ops) -> list[str] | None:
    adds = [k for op, k in ops if op == "+"]
    subs = [k for op, k in ops if op == "-"]
    if any(op == "*" for op, _ in ops) or (len(adds) < 2 and len(subs) < 2):
        return None
    steps: list[str] = []
    if len(adds) > 1:
        more, plus = _chain(rng, "add", adds)
        steps += more
    else:
        plus = adds[0] if adds else 0
    if len(subs) > 1:
        more, minus = _chain(rng, "take", subs)
        steps += more
    else:
        minus = subs[0] if subs else 0
    x = start
    if plus:
        if x + plus > MAX_NUMBER:
            return None
        steps.append(f"{x} + {plus} = {x + plus} .")
        x += plus
    if minus:
        if x - minus < 0:
            return None
        steps.append(f"{x} - {minus} = {x - minus} .")
    return steps


def render(rng: random.Random, start: int, ops, index: int, split: str) -> Problem:
    name = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    pronoun = rng.choice(("she", "he"))
    sentences = [f"{name} has {start} {item} ."]
    for j, (op, k) in enumerate(ops):
        verb = MUL_VERBS[k].format(item=item) if op == "*" else rng.choice(ADD_VERBS if op == "+" else SUB_VERBS)
        then = "then " if j and rng.random() < 0.5 else ""
        sentences.append(f"{then}{pronoun} {verb.format(k=k)} .")
    sentences.append(f"how many {item} now ?")
    target = start
    for op, k in ops:
        target = _apply(op, target, k)
    steps = None
    if rng.random() < 0.4:
        steps = _grouped_steps(rng, start, ops)
    if steps is None:
        steps = _sequential_steps(rng, start, ops)
    opener = rng.choice(OPENERS).format(a=start)
    closer = rng.choice(CLOSERS).format(y=target)
    answer = " ".join(([opener] if opener else []) + steps + [closer])
    return Problem(
        id=f"synthetic-{split}-{index}",
        question=" ".join(sentences),
        answer=answer,
        target=target,
        start=start,
        ops=tuple(ops),
    )


def generate(split: str, n: int, seed: int = 0) -> list[Problem]:
    """``n`` problems of ``split``, reproducible from ``seed``; train and test never share arithmetic."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: must be one of {SPLITS}")
    if n < 0:
        raise ValueError(f"n={n}: must be >= 0")
    rng = random.Random(f"{split}-{seed}")
    out: list[Problem] = []
    while len(out) < n:
        start, ops = _sample_arithmetic(rng)
        if split_of(start, ops) == split:
            out.append(render(rng, start, ops, len(out), split))
    return out


class TrainStream:
    """An endless, seeded stream of train-split problems for pretraining."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(f"stream-{seed}")
        self.count = 0

    def __next__(self) -> Problem:
        while True:
            start, ops = _sample_arithmetic(self.rng)
            if split_of(start, ops) == "train":
                self.count += 1
                return render(self.rng, start, ops, self.count - 1, "train")

    def __iter__(self) -> "TrainStream":
        return self


_NUMBER = re.compile(r"-?\d+")


def extract_answer(text: str) -> int | None:
    """The last integer in a response (GSM8K-style extraction), or None if there is none."""
    found = _NUMBER.findall(text)
    return int(found[-1]) if found else None


def score(response: str, target: int) -> bool:
    """Exact match of the extracted final number."""
    return extract_answer(response) == target
