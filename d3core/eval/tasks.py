"""Evaluation tasks: examples, prompt formats per model family, stop strings and scoring.

Tasks (the d3LLM leaderboard's, plus the embedded synthetic one):

=============  ==============================================================  ==================
name           prompt                                                          score
=============  ==============================================================  ==================
synthetic      the question, chat template (as the tiny models were trained)   last number
gsm8k          ``Q: {question}\\nA: Let's think step by step.`` (CoT 0-shot)   flexible-extract,
                                                                               strict-match
long_gsm8k     5 worked ``Question: ...\\nAnswer: ... #### N`` shots + question  flexible-extract,
                                                                               strict-match
math500        ``Problem:\\n{problem}\\n\\nSolution:`` (raw) or the problem with a  math-verify
               boxed-answer instruction (chat)
humaneval      the function stub to continue (raw) or an instruction with the  pass@1 (sandbox
               stub in a code block (chat)                                     + trusted judge)
mbpp           lm-eval's 3-shot ``[BEGIN] ... [DONE]`` prompt                   pass@1 (same)
=============  ==============================================================  ==================

Scoring is :meth:`Task.metrics`: per-example correctness under each of the task's metrics
(:attr:`Task.metric_names`; the first is the task's accuracy, :meth:`Task.score`). GSM8K's two
are lm-eval's filters (see :mod:`d3core.eval.scoring`); code is judged by
:mod:`d3core.eval.sandbox`.

Prompt style (``resolve_style``): ``auto`` follows the d3LLM harness: LLaDA gets GSM8K, Long-GSM8K
and MATH raw (no chat template) and the code tasks inside a chat turn; Dream and AR baselines get
everything through the chat template; the synthetic task always uses the chat template.
Long-GSM8K's shots are the last 5 GSM8K test records (the train split is not shipped); they
are excluded from its evaluation set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

from d3core.eval import benchmarks, codechecks, scoring, synthetic
from d3core.eval.benchmarks import Example
from d3core.eval.sandbox import CodeCheck, SandboxLimits, Verdict, run_checks

logger = logging.getLogger(__name__)

STYLES = ("auto", "chat", "raw")
RAW_FOR_LLADA = frozenset({"gsm8k", "long_gsm8k", "math500"})
CHAT_STOPS = ("</s>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>")
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
HUMANEVAL_INSTRUCTION = "Write a solution to the following problem and make sure that it passes the tests:"


@dataclass(frozen=True)
class Task:
    """One benchmark: how to load it, prompt it, cut the response and score it."""

    name: str
    stops: tuple[str, ...] = ()
    code: bool = False
    fewshot: tuple[Example, ...] = field(default=(), repr=False)

    # -- data ------------------------------------------------------------------------------
    def examples(self, n: int | None = None, seed: int = 0, data_dir: str | None = None) -> list[Example]:
        """The first ``n`` examples of the test split (all of them when ``n`` is None)."""
        if n is not None and n < 1:
            raise ValueError(f"n={n}: ask for at least one example (or None for the whole test split)")
        if self.name == "synthetic":
            items = [Example(p.id, p.question, str(p.target)) for p in synthetic.generate("test", n or 500, seed)]
        elif self.name == "gsm8k":
            items = benchmarks.gsm8k(data_dir)
        elif self.name == "long_gsm8k":
            items = benchmarks.gsm8k_fewshot_split(benchmarks.gsm8k(data_dir))[1]
        elif self.name == "math500":
            items = benchmarks.math500(data_dir)
        elif self.name == "humaneval":
            items = benchmarks.humaneval(data_dir)
        else:
            items = benchmarks.mbpp(data_dir)
        return items[:n] if n is not None else items

    # -- prompts ---------------------------------------------------------------------------
    def prompt_text(self, example: Example, style: str) -> str:
        """The prompt as text (before any chat template); ``style`` is ``chat`` or ``raw``."""
        q = example.question
        if self.name == "synthetic":
            return q
        if self.name == "gsm8k":
            return f"Q: {q}\nA: Let's think step by step."
        if self.name == "long_gsm8k":
            shots = "".join(f"Question: {s.question}\nAnswer: {s.meta['solution']}\n\n" for s in self.fewshot)
            return f"{shots}Question: {q}\nAnswer:"
        if self.name == "math500":
            return f"{q}\n{MATH_INSTRUCTION}" if style == "chat" else f"Problem:\n{q}\n\nSolution:"
        if self.name == "humaneval":
            return f"{HUMANEVAL_INSTRUCTION}\n```python\n{q}\n```\n" if style == "chat" else q
        shots = "".join(_mbpp_block(s) + f"{s.target}\n[DONE]\n\n" for s in self.fewshot)
        return shots + _mbpp_block(example)

    def encode(self, tokenizer, example: Example, style: str) -> list[int]:
        text = self.prompt_text(example, style)
        if style == "chat":
            templated = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                      add_generation_prompt=True, tokenize=False)
            return tokenizer(templated, add_special_tokens=False)["input_ids"]
        return tokenizer(text)["input_ids"]

    # -- responses -------------------------------------------------------------------------
    def cut(self, text: str, style: str = "chat") -> tuple[str, bool]:
        """The response up to the first stop string, and whether anything was cut.

        A raw HumanEval continuation also stops where the function body ends (lm-eval's stops).
        """
        stops = self.stops + CHAT_STOPS + (scoring.HUMANEVAL_STOPS if self.name == "humaneval" and style == "raw"
                                            else ())
        idx = [i for i in (text.find(s) for s in stops) if i >= 0]
        return (text[: min(idx)], True) if idx else (text, False)

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The task's metrics; the first is its accuracy (:meth:`score`)."""
        if self.name in ("gsm8k", "long_gsm8k"):
            return (scoring.FLEXIBLE, scoring.STRICT)
        return {"synthetic": ("exact_match",), "math500": ("math_verify",)}.get(self.name, ("pass@1",))

    def metrics(self, responses: Sequence[str], examples: Sequence[Example], style: str,
                limits: SandboxLimits = SandboxLimits(), workers: int = 2) -> dict[str, list[bool]]:
        """Correctness of each (already cut) response under each metric of :attr:`metric_names`."""
        if len(responses) != len(examples):
            raise ValueError(f"{len(responses)} responses for {len(examples)} examples: pass one response each")
        if self.name in ("gsm8k", "long_gsm8k"):
            phrase = scoring.COT_PHRASE if self.name == "gsm8k" else scoring.FEWSHOT_PHRASE
            per = [scoring.gsm8k_metrics(r, e.target, phrase) for r, e in zip(responses, examples)]
            return {m: [p[m] for p in per] for m in self.metric_names}
        if self.name == "synthetic":
            correct = [synthetic.score(r, int(e.target)) for r, e in zip(responses, examples)]
        elif self.name == "math500":
            correct = [scoring.score_math(r, e.target) for r, e in zip(responses, examples)]
        else:
            correct = [v.passed for v in self.verdicts(responses, examples, style, limits, workers)]
        return {self.metric_names[0]: correct}

    def score(self, responses: Sequence[str], examples: Sequence[Example], style: str,
              limits: SandboxLimits = SandboxLimits(), workers: int = 2) -> list[bool]:
        """Correctness of each (already cut) response under the task's first metric."""
        return self.metrics(responses, examples, style, limits, workers)[self.metric_names[0]]

    def verdicts(self, responses: Sequence[str], examples: Sequence[Example], style: str,
                 limits: SandboxLimits = SandboxLimits(), workers: int = 2) -> list[Verdict]:
        """A code task's verdicts (status, the limit that fired, why it failed) for each response."""
        return run_checks(self.checks(responses, examples, style), limits, workers)

    def checks(self, responses: Sequence[str], examples: Sequence[Example], style: str) -> list[CodeCheck]:
        """What the sandbox and the judge get for a code task's responses."""
        if len(responses) != len(examples):
            raise ValueError(f"{len(responses)} responses for {len(examples)} examples: pass one response each")
        if self.name == "humaneval":
            return [codechecks.humaneval_check(e, r, instruct=style == "chat") for r, e in zip(responses, examples)]
        if self.name == "mbpp":
            return [codechecks.mbpp_check(e, r) for r, e in zip(responses, examples)]
        raise ValueError(f"task {self.name!r} is not a code task: only humaneval and mbpp have code checks")


def _mbpp_block(e: Example) -> str:
    tests = "\n".join(e.meta["tests"])
    return (f"You are an expert Python programmer, and here is your task: {e.question} "
            f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")


TASK_NAMES = ("synthetic", "gsm8k", "long_gsm8k", "math500", "humaneval", "mbpp")


def get_task(name: str, data_dir: str | None = None) -> Task:
    if name == "synthetic":
        return Task("synthetic")
    if name == "gsm8k":
        return Task("gsm8k", stops=("Q:",))
    if name == "long_gsm8k":
        shots = benchmarks.gsm8k_fewshot_split(benchmarks.gsm8k(data_dir))[0]
        return Task("long_gsm8k", stops=("Question:",), fewshot=tuple(shots))
    if name == "math500":
        return Task("math500", stops=("Problem:",))
    if name == "humaneval":
        return Task("humaneval", code=True)
    if name == "mbpp":
        return Task("mbpp", stops=("[DONE]",), code=True, fewshot=tuple(benchmarks.mbpp_fewshot(data_dir)))
    raise ValueError(f"unknown task {name!r}: choose one of {TASK_NAMES}")


def resolve_style(style: str, family: str, task: str) -> str:
    """``chat`` or ``raw`` for ``task`` on a model of ``family`` (``llada``, ``dream``, ``llama``, ...)."""
    if style not in STYLES:
        raise ValueError(f"prompt style {style!r}: must be one of {STYLES}")
    if style != "auto":
        return style
    if task == "synthetic":
        return "chat"
    return "raw" if family == "llada" and task in RAW_FOR_LLADA else "chat"
