"""The peers' protocols: every family has every task, and prompts come out as the peers' harnesses build them."""

from __future__ import annotations

import pytest

from d3core.eval import protocols
from d3core.eval.protocols import (PEER_PROTOCOLS, Protocol, ar_family_for, checkpoint_family, get_protocol,
                                   resolve_protocol)
from d3core.eval.tasks import get_task
from d3core.models.shipped import TINY_AR_DIR, TINY_TEACHER_DIR

LEADERBOARD = ("gsm8k", "long_gsm8k", "math500", "humaneval", "mbpp")


def test_every_family_has_every_leaderboard_task_with_a_source():
    for family in ("llada", "dream", "ar-llada", "ar-dream"):
        for task in LEADERBOARD:
            p = get_protocol(family, task)
            assert (p.family, p.task) == (family, task) and p.peer_task and "d3LLM" in p.source
    assert len(PEER_PROTOCOLS) == 4 * len(LEADERBOARD)


def test_llada_math_is_minerva_four_shot_raw():
    task = get_task("math500")
    p = get_protocol("llada", "math500")
    e = task.examples(1)[0]
    text = task.prompt_text(e, p)
    assert not p.chat and p.fewshot == 4 and p.peer_task == "minerva_math"
    assert text.startswith("Problem:\nFind the domain of the expression")
    assert text.count("Problem:\n") == 5 and text.count("Final Answer: The final answer is") == 4
    assert text.endswith(f"Problem:\n{e.question}\n\nSolution:")
    assert "\nSolution: The expressions inside" in text  # lm-eval's target delimiter " " after "Solution:"


def test_dream_math_is_minerva_zero_shot_in_a_chat_turn(tok):
    task = get_task("math500")
    p = get_protocol("dream", "math500")
    e = task.examples(1)[0]
    assert p.chat and p.fewshot == 0
    assert task.prompt_text(e, p) == f"Problem:\n{e.question}\n\nSolution:"
    prompt = task.prompt(tok, e, p)
    assert prompt.startswith(tok.bos_token) and prompt.endswith("assistant ")


def test_humaneval_prompts_per_family(tok):
    task = get_task("humaneval")
    e = task.examples(1)[0]
    stub = e.meta["prompt"]
    llada = get_protocol("llada", "humaneval")
    # trailing space
    assert task.prompt_text(e, llada) == (f"{protocols.HUMANEVAL_INSTRUCTION}\n```python\n{stub}\n```\n ")
    assert task.assistant_prefix(e, llada) == "" and llada.sanitize and llada.chat
    dream = get_protocol("dream", "humaneval")
    assert task.prompt_text(e, dream) == f"{protocols.HUMANEVAL_INSTRUCTION}\n```{stub}"
    assert task.prompt(tok, e, dream).endswith(f"assistant Here is the completed function:\n```python\n{stub}\n")
    ar = get_protocol("ar-dream", "humaneval")  # raw: the user text, the target delimiter, then the prefix
    assert task.prompt(tok, e, ar) == (f"{protocols.HUMANEVAL_INSTRUCTION}\n```{stub} Here is the completed "
                                       f"function:\n```python\n{stub}\n")
    assert task.prompt(tok, e, get_protocol("ar-llada", "humaneval")) == stub


def test_mbpp_prompts_per_family():
    task = get_task("mbpp")
    e = task.examples(1)[0]
    llada = task.prompt_text(e, get_protocol("llada", "mbpp"))
    assert llada.count("[BEGIN]") == 4 and llada.count("[DONE]") == 3 and llada.endswith("[BEGIN]\n")
    dream = get_protocol("dream", "mbpp")
    text = task.prompt_text(e, dream)
    assert text.startswith("You are an expert Python programmer, and here is your task: ") and "[BEGIN]" not in text
    assert text.endswith(e.meta["tests"][-1]) and dream.fewshot == 0
    assert task.assistant_prefix(e, dream) == "Here is the completed function:\n```python\n"
    assert task.cut("def f():\n    return 1\n```\nmore", dream) == ("def f():\n    return 1\n", True)


def test_stops_follow_the_protocol():
    he = get_task("humaneval")
    body = "    return 1\n\ndef other():\n    pass\n"
    assert he.cut(body, get_protocol("dream", "humaneval")) == ("    return 1\n", True)
    assert he.cut(body, get_protocol("llada", "humaneval")) == (body, False)  # the LLaDA harness cuts nothing
    gsm = get_task("gsm8k")
    assert gsm.cut("so 4.\nQ: next", get_protocol("ar-llada", "gsm8k")) == ("so 4.\n", True)


def test_chat_prompts_carry_one_bos_and_raw_prompts_the_tokenizers_specials(tok):
    task = get_task("gsm8k")
    e = task.examples(1)[0]
    chat = task.encode(tok, e, get_protocol("dream", "gsm8k"))
    raw = task.encode(tok, e, get_protocol("llada", "gsm8k"))
    assert chat.count(tok.bos_token_id) == 1 and chat[0] == tok.bos_token_id
    assert raw == tok(task.prompt_text(e, "raw"))["input_ids"]


def test_resolution():
    assert resolve_protocol("auto", "llada", "gsm8k").family == "llada"
    assert resolve_protocol("auto", "llama", "mbpp").family == "ar-llada"  # a model type: the AR baseline
    assert resolve_protocol("auto", "dream", "mbpp").peer_task == "mbpp_instruct"
    assert resolve_protocol("chat", "llada", "gsm8k").family == "d3ray"
    assert resolve_protocol("auto", "dream", "synthetic").chat  # the tiny models' own format
    assert ar_family_for("dream") == "ar-dream" and ar_family_for("llama") == "ar-llada"
    assert checkpoint_family(str(TINY_TEACHER_DIR)) == "llada" and checkpoint_family(str(TINY_AR_DIR)) == "ar-llada"
    with pytest.raises(ValueError, match="prompt style"):
        resolve_protocol("fancy", "llada", "gsm8k")
    with pytest.raises(ValueError, match="no protocol"):
        get_protocol("gpt", "gsm8k")
    with pytest.raises(ValueError, match="not 'gsm8k'"):
        get_task("gsm8k").prompt_text(get_task("gsm8k").examples(1)[0], get_protocol("llada", "mbpp"))


def test_protocol_validation():
    with pytest.raises(ValueError, match="family"):
        Protocol("gpt", "gsm8k", "", "gsm8k_cot")
    with pytest.raises(ValueError, match="format"):
        Protocol("llada", "gsm8k", "", "poetry")
    with pytest.raises(ValueError, match="fewshot"):
        Protocol("llada", "gsm8k", "", "gsm8k_cot", fewshot=-1)
    with pytest.raises(ValueError, match="prefix_delimiter"):
        Protocol("llada", "gsm8k", "", "gsm8k_cot", chat=True, prefix_delimiter=" ")
    with pytest.raises(ValueError, match="wants 5 worked examples"):
        get_task("gsm8k").prompt_text(get_task("gsm8k").examples(1)[0],
                                      Protocol("llada", "gsm8k", "", "gsm8k_fewshot", fewshot=5))
