"""Loaders for the real benchmark test sets shipped in ``d3core/assets/eval``.

Each loader returns the published records, in their published order, as :class:`Example`
values: ``question`` is the text shown to the model, ``target`` the reference answer and
``meta`` whatever else scoring needs (the HumanEval prompt, test and entry point; MBPP's
tests and reference code; the GSM8K worked solution; the MATH reference solution).
``data_dir`` points at another folder holding the same file names (tests use the
project's ``shared/data`` copies through :func:`load_raw`).
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "eval"

FILES = {
    "gsm8k": "gsm8k_test.jsonl.gz",
    "math500": "math500_test.jsonl.gz",
    "humaneval": "humaneval.jsonl.gz",
    "mbpp": "mbpp_1-510.jsonl.gz",
}
MBPP_TEST_IDS = range(11, 511)  # the published test split
MBPP_FEWSHOT_IDS = (2, 3, 4)  # from the prompt split (1-10), as lm-eval's 3-shot MBPP uses
GSM8K_FEWSHOT = 5  # Long-GSM8K: 5 worked examples before the question
_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$")


@dataclass(frozen=True)
class Example:
    id: str
    question: str
    target: str
    meta: dict[str, Any] = field(default_factory=dict)


def load_raw(name: str, data_dir: str | Path | None = None) -> list[dict]:
    """The published records of benchmark ``name`` (gzip or plain JSON Lines)."""
    if name not in FILES:
        raise ValueError(f"unknown benchmark {name!r}: choose one of {sorted(FILES)}")
    path = Path(data_dir) / FILES[name] if data_dir is not None else ASSET_DIR / FILES[name]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall d3ray (the test sets ship in d3core/assets/eval)")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def gsm8k_final(answer: str) -> str:
    """The number after ``####`` in a GSM8K worked solution, commas removed."""
    match = _GSM8K_FINAL.search(answer.strip().splitlines()[-1])
    if match is None:
        raise ValueError(f"GSM8K answer {answer[-60:]!r} has no '#### N' line: is this a GSM8K record?")
    return match.group(1).replace(",", "")


def gsm8k(data_dir: str | Path | None = None) -> list[Example]:
    return [Example(f"gsm8k/{i}", r["question"], gsm8k_final(r["answer"]), {"solution": r["answer"]})
            for i, r in enumerate(load_raw("gsm8k", data_dir))]


def gsm8k_fewshot_split(examples: list[Example], shots: int = GSM8K_FEWSHOT) -> tuple[list[Example], list[Example]]:
    """(exemplars, evaluation set) for Long-GSM8K.

    lm-eval draws the 5 shots from the train split, which is not shipped; the last ``shots``
    test records serve as the exemplars instead and are left out of the evaluation set.
    """
    if len(examples) <= shots:
        raise ValueError(f"{len(examples)} GSM8K records: need more than shots={shots} to split off exemplars")
    return examples[-shots:], examples[:-shots]


def math500(data_dir: str | Path | None = None) -> list[Example]:
    return [Example(r["unique_id"], r["problem"], r["answer"],
                    {"solution": r["solution"], "subject": r["subject"], "level": r["level"]})
            for r in load_raw("math500", data_dir)]


def humaneval(data_dir: str | Path | None = None) -> list[Example]:
    return [Example(r["task_id"], r["prompt"], r["canonical_solution"],
                    {"prompt": r["prompt"], "test": r["test"], "entry_point": r["entry_point"]})
            for r in load_raw("humaneval", data_dir)]


def _mbpp_example(r: dict) -> Example:
    return Example(f"mbpp/{r['task_id']}", r["text"], r["code"],
                   {"tests": list(r["test_list"]), "setup": r.get("test_setup_code", "") or "",
                    "challenge_tests": list(r.get("challenge_test_list", []) or [])})


def mbpp(data_dir: str | Path | None = None, ids=MBPP_TEST_IDS) -> list[Example]:
    """MBPP records whose task_id lies in ``ids`` (default: the 500-task test split)."""
    wanted = set(ids)
    return [_mbpp_example(r) for r in load_raw("mbpp", data_dir) if r["task_id"] in wanted]


def mbpp_fewshot(data_dir: str | Path | None = None) -> list[Example]:
    by_id = {r["task_id"]: r for r in load_raw("mbpp", data_dir)}
    return [_mbpp_example(by_id[i]) for i in MBPP_FEWSHOT_IDS]
