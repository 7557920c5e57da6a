"""HumanEval and MBPP responses as :class:`~d3core.eval.sandbox.CodeCheck` values.

The program that runs in the sandbox is only the candidate's code (HumanEval: the prompt and
the completion; MBPP: the extracted solution). The benchmark's test code goes to the trusted
judge unchanged, so its float tolerances, helper functions and loops mean what they always
meant, while every call of the candidate in it crosses into the sandbox:

* HumanEval: the judge first runs the prompt (the helpers the tests use, such as ``poly`` or
  ``encode_cyclic``), binds the entry point (and so the test's ``candidate``) to the program's
  function, runs the test code and calls ``check(entry_point)``;
* MBPP: the judge runs the asserts; each function they call is the program's, and so is any
  value built by ``test_setup_code`` (which runs in the sandbox, after the program, because it
  may use the program's classes), passed to the program by name.
"""

from __future__ import annotations

import ast
import re

from d3core.eval.benchmarks import Example
from d3core.eval.sandbox import CodeCheck
from d3core.eval.sanitize import sanitize as sanitize_code
from d3core.eval.scoring import extract_code, truncate_completion


def _prompt_header(prompt: str) -> str:
    """The import lines of a HumanEval prompt (kept when the model rewrites the whole function)."""
    return "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))


def humaneval_source(prompt: str, entry_point: str, response: str, instruct: bool) -> str:
    """The program for one HumanEval response.

    ``instruct``: the response is chat text with the code in a block; if the block defines the
    entry point it is used whole (after the prompt's imports), else it continues the prompt.
    Otherwise the response is a raw continuation of the prompt, cut at stop sequences.
    """
    if instruct:
        code = extract_code(response)
        defines = re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE)
        return f"{_prompt_header(prompt)}\n{code}" if defines else prompt + code
    return prompt + truncate_completion(response)


def peer_block(response: str) -> str:
    """The peers' code extraction before ``sanitize``: after the first "```python\\n", up to the next fence."""
    return response.split("```python\n", 1)[-1].split("```")[0]


def humaneval_program(example: Example, response: str, instruct: bool, sanitize: bool = False) -> str:
    """The program for one HumanEval response; ``sanitize``: the peers' post-processing
    (prompt, a newline, the extracted block, then :func:`~d3core.eval.sanitize.sanitize` to the entry point)."""
    meta = example.meta
    if sanitize:
        return sanitize_code(meta["prompt"] + "\n" + peer_block(response), meta["entry_point"])
    return humaneval_source(meta["prompt"], meta["entry_point"], response, instruct)


def humaneval_check(example: Example, response: str, instruct: bool, sanitize: bool = False) -> CodeCheck:
    meta = example.meta
    return CodeCheck(source=humaneval_program(example, response, instruct, sanitize),
                     test=meta["test"], prelude=meta["prompt"], entry_point=meta["entry_point"],
                     check_function="check", id=example.id)


def tested_function(asserts: list[str]) -> str | None:
    """The function MBPP's ``assert f(...) == expected`` lines test (``f``), if they all agree.

    It is bound to the program even when it shadows a builtin (mbpp/126 defines ``sum``); other
    builtins in the asserts (``set``, ``sorted``...) stay the judge's own.
    """
    names = set()
    for line in asserts:
        try:
            node = ast.parse(line.strip()).body[0]
        except (SyntaxError, IndexError):
            return None
        test = node.test if isinstance(node, ast.Assert) else None
        left = test.left if isinstance(test, ast.Compare) else test
        if not (isinstance(left, ast.Call) and isinstance(left.func, ast.Name)):
            return None
        names.add(left.func.id)
    return names.pop() if len(names) == 1 else None


def mbpp_check(example: Example, response: str, sanitize: bool = False) -> CodeCheck:
    """``response`` is model text; the code is its fenced block or ``[BEGIN] ... [DONE]`` span, or with
    ``sanitize`` the peers' extraction and :func:`~d3core.eval.sanitize.sanitize` (no entry point)."""
    tests = example.meta["tests"]
    source = sanitize_code(peer_block(response)) if sanitize else extract_code(response)
    return CodeCheck(source=source, test="\n".join(tests), setup=example.meta["setup"],
                     entry_point=tested_function(tests), id=example.id)
