"""Evaluation protocols as the peers publish them: one :class:`Protocol` per (model family, task).

A protocol fixes everything about a prompt and its post-processing that changes a score: the
number of worked examples, whether the prompt goes through the chat template, the user-turn text,
the assistant prefix the response continues (lm-eval's ``gen_prefix``), the stop strings and
whether model-written code goes through the AST ``sanitize`` step (:mod:`d3core.eval.sanitize`).

Families (``docs/evaluation.md`` has the table with every source):

* ``llada`` -- the d3LLM harness for LLaDA (``utils/utils_LLaDA/eval_llada.py``, ``eval_scripts/llada_*.sh``):
  GSM8K, Long-GSM8K and MATH raw, the code tasks inside one chat turn;
* ``dream`` -- the d3LLM lm-eval fork for Dream (``utils/utils_Dream/eval_instruct``, ``--apply_chat_template``):
  everything in a chat turn, ``humaneval_instruct`` / ``mbpp_instruct`` with their assistant prefixes;
* ``ar-llada`` / ``ar-dream`` -- the AR baseline (Qwen2.5-7B-Instruct) as d3LLM ran it for each leaderboard:
  lm-eval ``--model hf`` without a chat template;
* ``d3ray`` -- the tiny models' own format (the synthetic task; always the chat template).

:func:`resolve_protocol` picks one: ``style="auto"`` gives the family's peer protocol, ``"chat"`` /
``"raw"`` a plain protocol with only that choice made (d3ray's earlier behaviour).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

FAMILIES = ("llada", "dream", "ar-llada", "ar-dream", "d3ray")
DLLM_FAMILIES = ("llada", "dream")
STYLES = ("auto", "chat", "raw")
FORMATS = ("synthetic", "gsm8k_cot", "gsm8k_fewshot", "minerva", "math_boxed", "humaneval_raw",
           "humaneval_llada", "humaneval_instruct", "mbpp_fewshot", "mbpp_instruct")
MINERVA_FILE = Path(__file__).resolve().parent.parent / "assets" / "eval" / "minerva_math_4shot.json"

# user-turn texts, exactly as the peers' harnesses build them
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
HUMANEVAL_INSTRUCTION = "Write a solution to the following problem and make sure that it passes the tests:"
HUMANEVAL_PREFIX = "Here is the completed function:\n```python\n{prompt}\n"
MBPP_INSTRUCT_PREFIX = "Here is the completed function:\n```python\n"
EXPERT = "You are an expert Python programmer, and here is your task: "

# stop strings of the lm-eval tasks the peers ran
GSM8K_COT_STOPS = ("Q:", "</s>", "<|im_end|>")
GSM8K_STOPS = ("Question:", "</s>", "<|im_end|>")
MINERVA_STOPS = ("Problem:",)
HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # lm-eval humaneval.yaml
MBPP_STOPS = ("[DONE]",)
FENCE_STOPS = ("```",)

D3LLM = "hao-ai-lab/d3LLM@e5bfcac"
FORK = f"{D3LLM} utils/utils_Dream/eval_instruct/lm_eval/tasks"


@dataclass(frozen=True)
class Protocol:
    """How one model family is prompted and post-processed on one task."""

    family: str
    task: str
    peer_task: str  # the lm-eval task the peers ran ("" where none)
    format: str  # the user-turn layout, one of FORMATS
    fewshot: int = 0
    chat: bool = False
    assistant_prefix: str = ""  # text the response continues; "{prompt}" is HumanEval's stub
    prefix_delimiter: str = ""  # raw prompts only: between the user text and the prefix (lm-eval target_delimiter)
    stops: tuple[str, ...] = ()
    sanitize: bool = False  # code goes through the AST sanitize step before it is judged
    source: str = ""
    note: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r}: must be one of {FAMILIES}")
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r}: must be one of {FORMATS}")
        if self.fewshot < 0:
            raise ValueError(f"fewshot={self.fewshot}: the number of worked examples must be >= 0")
        if self.prefix_delimiter and self.chat:
            raise ValueError("prefix_delimiter only applies to raw prompts: leave it empty when chat=True")
        object.__setattr__(self, "stops", tuple(self.stops))

    @property
    def style(self) -> str:
        return "chat" if self.chat else "raw"

    def prefix_for(self, stub: str = "") -> str:
        """The assistant prefix with HumanEval's function stub filled in."""
        return self.assistant_prefix.replace("{prompt}", stub)

    def describe(self) -> dict:
        """The protocol as plain JSON data (tuples as lists), as cell records store it."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _p(family: str, task: str, peer_task: str, fmt: str, **kw) -> Protocol:
    return Protocol(family, task, peer_task, fmt, **kw)


_LLADA_SRC = (f"{D3LLM} utils/utils_LLaDA/eval_llada.py (is_instruct only for humaneval/mbpp), "
              "eval_scripts/llada_{}.sh")
_DREAM_SRC = f"{D3LLM} eval_scripts/dream_{{}}.sh (--apply_chat_template), {FORK}/{{}}"
_AR_SRC = f"{D3LLM} eval_scripts/{{}}.sh, the Qwen2.5-7B-Instruct block (--model hf, no chat template)"
_SHOTS_NOTE = "shots: the last 5 GSM8K test records (the train split is not shipped), left out of the evaluation set"
_MATH500_NOTE = "items: MATH-500, not the full 5,000-problem MATH test set the leaderboard's minerva_math uses"
_SANITIZE = "utils/utils_LLaDA/postprocess_code_{}.py + sanitize.py"

PEER_PROTOCOLS: dict[str, Protocol] = {p.family + "/" + p.task: p for p in [
    # -- LLaDA: the d3LLM harness (raw prompts except the code tasks)
    _p("llada", "gsm8k", "gsm8k_cot_zeroshot", "gsm8k_cot", stops=GSM8K_COT_STOPS,
       source=_LLADA_SRC.format("gsm8k_cot")),
    _p("llada", "long_gsm8k", "gsm8k", "gsm8k_fewshot", fewshot=5, stops=GSM8K_STOPS,
       source=_LLADA_SRC.format("long_gsm8k"), note=_SHOTS_NOTE),
    _p("llada", "math500", "minerva_math", "minerva", fewshot=4, stops=MINERVA_STOPS,
       source=_LLADA_SRC.format("math") + "; shots: lm-eval minerva_math/utils.py list_fewshot_samples",
       note=_MATH500_NOTE),
    _p("llada", "humaneval", "humaneval", "humaneval_llada", chat=True, sanitize=True,
       source=_LLADA_SRC.format("humaneval") + "; " + _SANITIZE.format("humaneval"),
       note="no stop strings: the chat response's first ```python block, prompt prepended, then sanitize"),
    _p("llada", "mbpp", "mbpp", "mbpp_fewshot", fewshot=3, chat=True, stops=MBPP_STOPS, sanitize=True,
       source=_LLADA_SRC.format("mbpp") + "; " + _SANITIZE.format("mbpp"),
       note="the raw 3-shot [BEGIN]...[DONE] text (shots: MBPP ids 2-4) inside one user turn"),
    # -- Dream: the d3LLM lm-eval fork with --apply_chat_template
    _p("dream", "gsm8k", "gsm8k_cot_zeroshot", "gsm8k_cot", chat=True, stops=GSM8K_COT_STOPS,
       source=_DREAM_SRC.format("gsm8k_cot", "gsm8k/gsm8k-cot-zeroshot.yaml")),
    _p("dream", "long_gsm8k", "gsm8k", "gsm8k_fewshot", fewshot=5, chat=True, stops=GSM8K_STOPS,
       source=_DREAM_SRC.format("long_gsm8k", "gsm8k/gsm8k.yaml"),
       note=_SHOTS_NOTE + "; the shots and the question form one user turn (no --fewshot_as_multiturn)"),
    _p("dream", "math500", "minerva_math", "minerva", chat=True, stops=MINERVA_STOPS,
       source=_DREAM_SRC.format("math", "minerva_math/minerva_math_algebra.yaml"),
       note=_MATH500_NOTE + "; 0-shot: the scripts pass --num_fewshot 0 for Dream"),
    _p("dream", "humaneval", "humaneval_instruct", "humaneval_instruct", chat=True,
       assistant_prefix=HUMANEVAL_PREFIX, stops=HUMANEVAL_STOPS, sanitize=True,
       source=_DREAM_SRC.format("humaneval", "humaneval/humaneval_instruct.yaml + utils.py build_predictions_instruct"),
       note="the fork's text: '...passes the tests:\\n```{prompt}' (no 'python', no closing fence), "
            "unlike lm-eval 0.4.13's humaneval_instruct"),
    _p("dream", "mbpp", "mbpp_instruct", "mbpp_instruct", chat=True, assistant_prefix=MBPP_INSTRUCT_PREFIX,
       stops=FENCE_STOPS, source=_DREAM_SRC.format("mbpp", "mbpp/mbpp_instruct.yaml"),
       note="0-shot as the fork's YAML and dParallel's table; the d3LLM script passes --num_fewshot 4, "
            "which lm-eval's first_n sampler refuses with the 3 listed shots"),
    # -- the AR baseline of the LLaDA leaderboard (lm-eval --model hf, raw prompts)
    _p("ar-llada", "gsm8k", "gsm8k_cot_zeroshot", "gsm8k_cot", stops=GSM8K_COT_STOPS,
       source=_AR_SRC.format("llada_gsm8k_cot")),
    _p("ar-llada", "long_gsm8k", "gsm8k", "gsm8k_fewshot", fewshot=5, stops=GSM8K_STOPS,
       source=_AR_SRC.format("llada_long_gsm8k"), note=_SHOTS_NOTE),
    _p("ar-llada", "math500", "minerva_math", "minerva", fewshot=4, stops=MINERVA_STOPS,
       source=_AR_SRC.format("llada_math"), note=_MATH500_NOTE),
    _p("ar-llada", "humaneval", "humaneval", "humaneval_raw", stops=HUMANEVAL_STOPS, sanitize=True,
       source=_AR_SRC.format("llada_humaneval") + " + postprocess_code_humaneval.py"),
    _p("ar-llada", "mbpp", "mbpp", "mbpp_fewshot", fewshot=3, stops=MBPP_STOPS,
       source=f"{D3LLM} eval_scripts/llada_mbpp.sh",
       note="inferred: the script's Qwen block runs humaneval; lm-eval's mbpp 3-shot as for LLaDA"),
    # -- the AR baseline of the Dream leaderboard
    _p("ar-dream", "gsm8k", "gsm8k_cot_zeroshot", "gsm8k_cot", stops=GSM8K_COT_STOPS,
       source=_AR_SRC.format("dream_gsm8k_cot")),
    _p("ar-dream", "long_gsm8k", "gsm8k", "gsm8k_fewshot", fewshot=5, stops=GSM8K_STOPS,
       source=_AR_SRC.format("dream_long_gsm8k"), note=_SHOTS_NOTE),
    _p("ar-dream", "math500", "minerva_math", "minerva", fewshot=4, stops=MINERVA_STOPS,
       source=_AR_SRC.format("dream_math"), note=_MATH500_NOTE),
    _p("ar-dream", "humaneval", "humaneval_instruct", "humaneval_instruct", assistant_prefix=HUMANEVAL_PREFIX,
       prefix_delimiter=" ", stops=HUMANEVAL_STOPS, sanitize=True, source=_AR_SRC.format("dream_humaneval"),
       note="raw text: the user text, lm-eval's target delimiter ' ', then the prefix"),
    _p("ar-dream", "mbpp", "mbpp_instruct", "mbpp_instruct", assistant_prefix=MBPP_INSTRUCT_PREFIX,
       stops=FENCE_STOPS, source=_AR_SRC.format("dream_mbpp"), note="0-shot (--num_fewshot 0)"),
]}

_PLAIN_FORMATS = {"synthetic": "synthetic", "gsm8k": "gsm8k_cot", "long_gsm8k": "gsm8k_fewshot",
                  "math500": "minerva", "humaneval": "humaneval_raw", "mbpp": "mbpp_fewshot"}
_PLAIN_STOPS = {"gsm8k": ("Q:",), "long_gsm8k": ("Question:",), "math500": ("Problem:",), "mbpp": MBPP_STOPS}
_PLAIN_SHOTS = {"long_gsm8k": 5, "mbpp": 3}


def plain_protocol(task: str, chat: bool) -> Protocol:
    """d3ray's own protocol with only chat-or-raw chosen (the tiny models' format, and ``--prompt-style``)."""
    if task not in _PLAIN_FORMATS:
        raise ValueError(f"unknown task {task!r}: choose one of {tuple(_PLAIN_FORMATS)}")
    fmt = _PLAIN_FORMATS[task]
    if chat and task == "math500":
        fmt = "math_boxed"
    elif chat and task == "humaneval":
        fmt = "humaneval_llada"
    stops = _PLAIN_STOPS.get(task, ())
    if task == "humaneval" and not chat:  # a raw continuation ends where the function body ends
        from d3core.eval.scoring import HUMANEVAL_STOPS as raw_stops

        stops = raw_stops
    return Protocol("d3ray", task, "", fmt, fewshot=_PLAIN_SHOTS.get(task, 0), chat=chat, stops=stops,
                    source="d3ray")


def family_of(model_type: str) -> str:
    """The protocol family of a checkpoint's ``model_type``: ``llada``, ``dream``, else the AR baseline's."""
    kind = (model_type or "").lower()
    return kind if kind in DLLM_FAMILIES else "ar-llada"


def checkpoint_family(uri: str) -> str:
    """The protocol family of the checkpoint at ``uri`` (a local path or fsspec URI with a ``config.json``)."""
    import fsspec

    with fsspec.open(uri.rstrip("/") + "/config.json", "r", encoding="utf-8") as f:
        return family_of(str(json.load(f).get("model_type", "")))


def ar_family_for(dllm_family: str) -> str:
    """The AR baseline's protocol on the leaderboard of ``dllm_family`` (``llada`` -> ``ar-llada``)."""
    return f"ar-{dllm_family}" if dllm_family in DLLM_FAMILIES else "ar-llada"


def get_protocol(family: str, task: str) -> Protocol:
    """The peers' protocol of ``family`` on ``task``; the synthetic task always uses d3ray's chat format."""
    if task == "synthetic":
        return plain_protocol("synthetic", chat=True)
    if family == "d3ray":
        return plain_protocol(task, chat=True)
    key = f"{family}/{task}"
    if key not in PEER_PROTOCOLS:
        raise ValueError(f"no protocol for family {family!r} on task {task!r}: families are {FAMILIES}, tasks "
                         f"{tuple(_PLAIN_FORMATS)}")
    return PEER_PROTOCOLS[key]


def resolve_protocol(style: str, family: str, task: str) -> Protocol:
    """``auto``: the peers' protocol of ``family`` (a model type such as ``llama`` means the AR baseline);
    ``chat`` / ``raw``: d3ray's plain protocol with that choice."""
    if style not in STYLES:
        raise ValueError(f"prompt style {style!r}: must be one of {STYLES}")
    if style != "auto":
        return plain_protocol(task, chat=style == "chat")
    return get_protocol(family if family in FAMILIES else family_of(family), task)


@lru_cache(maxsize=1)
def minerva_shots() -> tuple[tuple[str, str], ...]:
    """The 4 (problem, solution) pairs of the Minerva MATH prompt."""
    with open(MINERVA_FILE, encoding="utf-8") as f:
        return tuple((s["problem"], s["solution"]) for s in json.load(f)["shots"])
