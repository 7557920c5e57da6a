"""Evaluation tasks: examples, prompts under a protocol, stop strings and scoring.

Tasks (the d3LLM leaderboard's, plus the embedded synthetic one):

=============  ===========================================  =======================================
name           items                                        score
=============  ===========================================  =======================================
synthetic      generated arithmetic problems                last number
gsm8k          GSM8K test (1,319)                           flexible-extract, strict-match
long_gsm8k     GSM8K test less the 5 shots (1,314)          flexible-extract, strict-match
math500        MATH-500                                     math-verify
humaneval      HumanEval (164)                              pass@1 (sandbox + trusted judge)
mbpp           MBPP test split (500)                        pass@1 (same)
=============  ===========================================  =======================================

How a task is prompted and post-processed is a :class:`~d3core.eval.protocols.Protocol`: the
peers' settings per model family (few-shot count, chat or raw, the assistant prefix, stops,
``sanitize``), or d3ray's plain ``chat`` / ``raw`` style. Every method that depends on it takes
``protocol`` as a :class:`Protocol` or a style string (``"chat"`` / ``"raw"``: the plain protocol).

Scoring is :meth:`Task.metrics`: per-example correctness under each of the task's metrics
(:attr:`Task.metric_names`; the first is the task's accuracy, :meth:`Task.score`). GSM8K's two
are lm-eval's filters (see :mod:`d3core.eval.scoring`); code is judged by
:mod:`d3core.eval.sandbox`. :meth:`Task.judge` also returns each response's extracted answer and,
for code, the sandbox verdict (the per-sample records of :mod:`d3core.eval.records`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from d3core.eval import benchmarks, codechecks, protocols, scoring, synthetic
from d3core.eval.benchmarks import Example
from d3core.eval.protocols import Protocol, plain_protocol, resolve_protocol
from d3core.eval.sandbox import CodeCheck, SandboxLimits, Verdict, run_checks

STYLES = protocols.STYLES
RAW_FOR_LLADA = frozenset({"gsm8k", "long_gsm8k", "math500"})
CHAT_STOPS = ("</s>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>")
MATH_INSTRUCTION = protocols.MATH_INSTRUCTION
HUMANEVAL_INSTRUCTION = protocols.HUMANEVAL_INSTRUCTION


@dataclass(frozen=True)
class Judgement:
    """Every response's verdict under each metric, its extracted answer and, for code, the sandbox's verdict."""

    metrics: dict[str, list[bool]]
    answers: list[str | None]
    verdicts: list[Verdict] | None = None


@dataclass(frozen=True)
class Task:
    """One benchmark: how to load it, prompt it under a protocol, cut the response and score it."""

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

    def protocol(self, protocol: Protocol | str) -> Protocol:
        """``protocol`` itself, or the plain protocol of a style string (``chat`` / ``raw``)."""
        if isinstance(protocol, Protocol):
            if protocol.task != self.name:
                raise ValueError(f"protocol {protocol.family}/{protocol.task} is for task {protocol.task!r}, not "
                                 f"{self.name!r}: pass get_protocol(family, {self.name!r})")
            return protocol
        if protocol not in ("chat", "raw"):
            raise ValueError(f"prompt style {protocol!r}: pass 'chat', 'raw' or a Protocol")
        return plain_protocol(self.name, chat=protocol == "chat")

    def shots(self, protocol: Protocol) -> tuple[Example, ...]:
        if protocol.fewshot > len(self.fewshot):
            raise ValueError(f"protocol {protocol.family}/{self.name} wants {protocol.fewshot} worked examples; "
                             f"task {self.name!r} has {len(self.fewshot)}")
        return self.fewshot[: protocol.fewshot]

    # -- prompts ---------------------------------------------------------------------------
    def prompt_text(self, example: Example, protocol: Protocol | str) -> str:
        """The user text (before any chat template and assistant prefix)."""
        p = self.protocol(protocol)
        q, fmt = example.question, p.format
        if fmt == "synthetic":
            return q
        if fmt == "gsm8k_cot":
            return f"Q: {q}\nA: Let's think step by step."
        if fmt == "gsm8k_fewshot":
            shots = "".join(f"Question: {s.question}\nAnswer: {s.meta['solution']}\n\n" for s in self.shots(p))
            return f"{shots}Question: {q}\nAnswer:"
        if fmt == "minerva":
            shots = "".join(f"Problem:\n{s.question}\n\nSolution: {s.meta['solution']}\n\n" for s in self.shots(p))
            return f"{shots}Problem:\n{q}\n\nSolution:"
        if fmt == "math_boxed":
            return f"{q}\n{MATH_INSTRUCTION}"
        if fmt == "humaneval_raw":
            return q
        if fmt == "humaneval_llada":  # the d3LLM LLaDA harness's text, its trailing space included
            return f"{HUMANEVAL_INSTRUCTION}\n```python\n{q}\n```\n" + (" " if p.family == "llada" else "")
        if fmt == "humaneval_instruct":  # the d3LLM lm-eval fork's humaneval_instruct
            return f"{HUMANEVAL_INSTRUCTION}\n```{q}"
        if fmt == "mbpp_instruct":
            return protocols.EXPERT + f"{q} Your code should pass these tests:\n\n" + "\n".join(example.meta["tests"])
        shots = "".join(_mbpp_block(s) + f"{s.target}\n[DONE]\n\n" for s in self.shots(p))
        return shots + _mbpp_block(example)

    def assistant_prefix(self, example: Example, protocol: Protocol | str) -> str:
        """The text the response continues (lm-eval's ``gen_prefix``); part of the prompt, not of the response."""
        return self.protocol(protocol).prefix_for(example.meta.get("prompt", ""))

    def prompt(self, tokenizer, example: Example, protocol: Protocol | str) -> str:
        """The whole prompt as text: chat-templated when the protocol says so, the assistant prefix last."""
        p = self.protocol(protocol)
        text, prefix = self.prompt_text(example, p), self.assistant_prefix(example, p)
        if p.chat:
            templated = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                      add_generation_prompt=True, tokenize=False)
            return templated + prefix
        return text + (p.prefix_delimiter if prefix else "") + prefix

    def encode(self, tokenizer, example: Example, protocol: Protocol | str) -> list[int]:
        """Prompt ids. A chat template carries its own BOS; a raw prompt gets the tokenizer's special tokens."""
        p = self.protocol(protocol)
        return tokenizer(self.prompt(tokenizer, example, p), add_special_tokens=not p.chat)["input_ids"]

    # -- responses -------------------------------------------------------------------------
    def cut(self, text: str, protocol: Protocol | str = "chat") -> tuple[str, bool]:
        """The response up to the first stop string of the protocol (or of the task), and whether anything was cut."""
        p = self.protocol(protocol)
        stops = (p.stops or self.stops) + CHAT_STOPS
        idx = [i for i in (text.find(s) for s in stops if s) if i >= 0]
        return (text[: min(idx)], True) if idx else (text, False)

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The task's metrics; the first is its accuracy (:meth:`score`)."""
        if self.name in ("gsm8k", "long_gsm8k"):
            return (scoring.FLEXIBLE, scoring.STRICT)
        return {"synthetic": ("exact_match",), "math500": ("math_verify",)}.get(self.name, ("pass@1",))

    def judge(self, responses: Sequence[str], examples: Sequence[Example], protocol: Protocol | str,
              limits: SandboxLimits = SandboxLimits(), workers: int = 2) -> Judgement:
        """Correctness of each (already cut) response under each metric, with the answers that were judged."""
        if len(responses) != len(examples):
            raise ValueError(f"{len(responses)} responses for {len(examples)} examples: pass one response each")
        p = self.protocol(protocol)
        if self.name in ("gsm8k", "long_gsm8k"):
            phrase = scoring.COT_PHRASE if self.name == "gsm8k" else scoring.FEWSHOT_PHRASE
            per = [scoring.gsm8k_metrics(r, e.target, phrase) for r, e in zip(responses, examples)]
            answers = [_text(scoring.numeric_answer(r).value) for r in responses]
            return Judgement({m: [x[m] for x in per] for m in self.metric_names}, answers)
        if self.name == "synthetic":
            correct = [synthetic.score(r, int(e.target)) for r, e in zip(responses, examples)]
            return Judgement({"exact_match": correct}, [_text(synthetic.extract_answer(r)) for r in responses])
        if self.name == "math500":
            correct = [scoring.score_math(r, e.target) for r, e in zip(responses, examples)]
            return Judgement({"math_verify": correct}, [scoring.extract_math(r) for r in responses])
        checks = self.checks(responses, examples, p)
        verdicts = run_checks(checks, limits, workers)
        return Judgement({"pass@1": [v.passed for v in verdicts]}, [c.source for c in checks], verdicts)

    def metrics(self, responses: Sequence[str], examples: Sequence[Example], protocol: Protocol | str,
                limits: SandboxLimits = SandboxLimits(), workers: int = 2) -> dict[str, list[bool]]:
        """Correctness of each (already cut) response under each metric of :attr:`metric_names`."""
        return self.judge(responses, examples, protocol, limits, workers).metrics

    def score(self, responses: Sequence[str], examples: Sequence[Example], protocol: Protocol | str,
              limits: SandboxLimits = SandboxLimits(), workers: int = 2) -> list[bool]:
        """Correctness of each (already cut) response under the task's first metric."""
        return self.metrics(responses, examples, protocol, limits, workers)[self.metric_names[0]]

    def verdicts(self, responses: Sequence[str], examples: Sequence[Example], protocol: Protocol | str,
                 limits: SandboxLimits = SandboxLimits(), workers: int = 2) -> list[Verdict]:
        """A code task's verdicts (status, the limit that fired, why it failed) for each response."""
        return run_checks(self.checks(responses, examples, protocol), limits, workers)

    def checks(self, responses: Sequence[str], examples: Sequence[Example],
               protocol: Protocol | str) -> list[CodeCheck]:
        """What the sandbox and the judge get for a code task's responses."""
        if len(responses) != len(examples):
            raise ValueError(f"{len(responses)} responses for {len(examples)} examples: pass one response each")
        p = self.protocol(protocol)
        if self.name == "humaneval":
            return [codechecks.humaneval_check(e, r, instruct=p.chat, sanitize=p.sanitize)
                    for r, e in zip(responses, examples)]
        if self.name == "mbpp":
            return [codechecks.mbpp_check(e, r, sanitize=p.sanitize) for r, e in zip(responses, examples)]
        raise ValueError(f"task {self.name!r} is not a code task: only humaneval and mbpp have code checks")


def _text(value) -> str | None:
    return None if value is None else str(value)


def _mbpp_block(e: Example) -> str:
    tests = "\n".join(e.meta["tests"])
    return (f"You are an expert Python programmer, and here is your task: {e.question} "
            f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")


def _minerva_examples() -> tuple[Example, ...]:
    return tuple(Example(f"minerva/{i}", problem, "", {"solution": solution})
                 for i, (problem, solution) in enumerate(protocols.minerva_shots()))


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
        return Task("math500", stops=("Problem:",), fewshot=_minerva_examples())
    if name == "humaneval":
        return Task("humaneval", code=True)
    if name == "mbpp":
        return Task("mbpp", stops=("[DONE]",), code=True, fewshot=tuple(benchmarks.mbpp_fewshot(data_dir)))
    raise ValueError(f"unknown task {name!r}: choose one of {TASK_NAMES}")


def resolve_style(style: str, family: str, task: str) -> str:
    """``chat`` or ``raw`` for ``task`` on a model of ``family`` (``llada``, ``dream``, ``llama``, ...)."""
    return resolve_protocol(style, family, task).style
