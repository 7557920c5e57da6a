"""The peers' sanitize step, and reference solutions judged through it under each family's code protocol."""

from __future__ import annotations

import pytest

from d3core.eval.protocols import get_protocol
from d3core.eval.sanitize import longest_valid_span, sanitize
from d3core.eval.tasks import get_task

CHATTY = """Sure! Here is the solution:
```python
import math
from typing import List

def helper(x):
\treturn x * 2

def unused():
    return 1

def noop():
    print("no return: dropped")

def f(xs: List[int]):
    return sum(helper(x) for x in xs) + math.floor(0.5)

print(f([1, 2]))
```
It doubles each value."""


def test_keeps_imports_and_what_the_entry_point_reaches():
    code = sanitize(CHATTY.split("```python\n", 1)[-1].split("```")[0], "f")
    assert code.splitlines()[:2] == ["import math", "from typing import List"]
    assert "def helper(x):\n    return x * 2" in code and "def f(xs: List[int]):" in code
    assert "unused" not in code and "noop" not in code and "print(f(" not in code
    namespace: dict = {}
    exec(compile(code, "<sanitized>", "exec"), namespace)  # noqa: S102 - our own literal test code
    assert namespace["f"]([1, 2]) == 6


def test_without_an_entry_point_every_definition_with_a_return_is_kept():
    code = sanitize("def a():\n    return 1\ndef b():\n    pass\nX = 3\nprint(X)\n")
    assert code == "def a():\n    return 1\nX = 3"


def test_the_longest_parsable_span_is_taken_from_prose():
    text = "Here you go:\ndef g(n):\n    return n + 1\n\nThis adds one, so g(1) is 2."
    assert longest_valid_span(text) == "def g(n):\n    return n + 1\n"
    assert sanitize(text, "g") == "def g(n):\n    return n + 1"
    assert sanitize("no code here, only words !!", "g") == ""


def test_a_later_definition_replaces_an_earlier_one():
    code = sanitize("def f():\n    return 1\ndef f():\n    return 2\n", "f")
    assert code == "def f():\n    return 2"


def test_attribute_chains_count_only_their_last_name():
    """As the peers' step: ``self.helper()`` reaches ``helper``; ``helper.x`` does not reach ``helper``."""
    kept = sanitize("def helper():\n    return 1\ndef f(o):\n    return o.helper()\n", "f")
    assert "def helper" in kept
    dropped = sanitize("def helper():\n    return 1\ndef f():\n    return helper.__name__\n", "f")
    assert "def helper" not in dropped


@pytest.mark.parametrize("family", ["llada", "dream", "ar-llada", "ar-dream"])
def test_humaneval_references_pass_through_each_familys_post_processing(family):
    task = get_task("humaneval")
    examples = task.examples(6)
    p = get_protocol(family, "humaneval")
    if p.chat and not p.assistant_prefix:  # LLaDA: the whole function in a chat response's block
        responses = [f"Here it is:\n```python\n{e.meta['prompt']}{e.target}```\nDone." for e in examples]
    else:  # a continuation of the prompt (after the assistant prefix, if any)
        responses = [task.cut(e.target + "```\n", p)[0] for e in examples]
    judged = task.judge(responses, examples, p)
    assert all(v.status == "passed" for v in judged.verdicts), [v.reason for v in judged.verdicts]
    assert judged.metrics["pass@1"] == [True] * len(examples)
    assert all(e.meta["entry_point"] in a for a, e in zip(judged.answers, examples))  # the judged program


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_mbpp_references_pass_through_each_familys_post_processing(family):
    task = get_task("mbpp")
    examples = task.examples(6)
    p = get_protocol(family, "mbpp")
    responses = [task.cut(e.target + ("\n[DONE]" if family == "llada" else "\n```"), p)[0] for e in examples]
    assert task.score(responses, examples, p) == [True] * len(examples)
    broken = task.score(["def nothing():\n    pass\n"] * 2, examples[:2], p)
    assert broken == [False, False]
