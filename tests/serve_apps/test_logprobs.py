"""Log-probability tokens and ``text_offset`` against the returned text, through the app in-process (no Ray).

The ingress's own request path (``_serve``: parse, tokenize, answer or stream) and the replica's
own ``generate`` / ``generate_stream`` are bound onto plain objects around one in-process
:class:`~serve_apps.batching.ContinuousEngine` on the tiny teacher. The tiny tokenizer is word-level:
its decoder puts a space between tokens, so each token's text must carry that space.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import types
from types import SimpleNamespace

import pytest

from d3core.eval import synthetic
from d3core.models.checkpoint import load_config
from d3core.sft import encode_prompt
from serve_apps import protocol as P
from serve_apps.admission import Admission, RowGate
from serve_apps.batching import ContinuousEngine
from serve_apps.config import ServeConfig
from serve_apps.metrics import HttpMetrics
from serve_apps.openai_app import OpenAIIngress
from serve_apps.outputs import ChoiceText
from serve_apps.replica import D3LLMModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL = "d3ray-tiny"
INGRESS_METHODS = ("_serve", "_prepare", "_check_model", "_complete", "_stream", "_on_output")
REPLICA_METHODS = ("generate", "generate_stream", "_enter", "_stream")


class _Stream:
    """What a streaming handle call returns, over an async iterator: ``__anext__`` and ``cancel``."""

    def __init__(self, events) -> None:
        self.events = events

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.events.__anext__()

    def cancel(self) -> None:
        pass


class _Handle:
    """The model deployment's handle, calling the replica's own methods in this process."""

    def __init__(self, replica: SimpleNamespace) -> None:
        self.replica = replica
        self.generate = SimpleNamespace(remote=lambda gen, admit_by: replica.generate(gen, admit_by))
        self.generate_stream = SimpleNamespace(remote=lambda gen, admit_by: _Stream(replica.generate_stream(gen,
                                                                                                           admit_by)))

    def options(self, stream: bool) -> _Handle:
        return self


class App:
    """``post(path, body)``: the route's JSON body, or the list of its SSE events when streaming."""

    def __init__(self, teacher, tok) -> None:
        cfg = ServeConfig.from_preset("tiny")
        self.engine = ContinuousEngine(teacher, tok, cfg.sampler, cfg.max_batch_size)
        replica = SimpleNamespace(cfg=cfg, engine=self.engine, gate=RowGate(cfg.max_batch_size, cfg.max_queued_requests))
        for name in REPLICA_METHODS:
            setattr(replica, name, types.MethodType(getattr(D3LLMModel.func_or_class, name), replica))
        model_config = load_config(cfg.model)
        admission = Admission(cfg.row_capacity, cfg.max_batch_size, cfg.queue_budget_s, running=lambda: 1)
        self.ingress = SimpleNamespace(cfg=cfg, tokenizer=tok, model_config=model_config,
                                       context=model_config.max_seq_len, metrics=HttpMetrics(), admission=admission,
                                       model=_Handle(replica), cpu=concurrent.futures.ThreadPoolExecutor(1))
        for name in INGRESS_METHODS:
            setattr(self.ingress, name, types.MethodType(getattr(OpenAIIngress.func_or_class, name), self.ingress))

        async def read_body(request) -> bytes:
            return request  # the "request" handed to _serve is its raw body

        self.ingress._read_body = read_body

    def post(self, path: str, body: dict):
        chat = path == "/v1/chat/completions"
        model_cls = P.ChatCompletionRequest if chat else P.CompletionRequest

        async def call():
            response = await self.ingress._serve(json.dumps({"model": MODEL, **body}).encode(), model_cls, chat)
            if isinstance(response, dict):
                return response
            return [json.loads(e[len("data: "):]) async for e in response.body_iterator
                    if e.strip() != "data: [DONE]"]

        return asyncio.run(call())

    def close(self) -> None:
        asyncio.run(self.engine.close())
        self.ingress.cpu.shutdown()


@pytest.fixture(scope="module")
def app(teacher, tok):
    app = App(teacher, tok)
    yield app
    app.close()


@pytest.fixture(scope="module")
def questions():
    return [p.question for p in synthetic.generate("test", 4, seed=21)]


@pytest.fixture(scope="module")
def prompt(tok, questions):
    return tok.decode(encode_prompt(tok, questions[1]))  # a chat prompt as text: the answer comes after it


def chat_body(question: str, **kw) -> dict:
    return {"messages": [{"role": "user", "content": question}], "temperature": 0, "logprobs": True, **kw}


def check_offsets(text: str, tokens: list[str], offsets: list[int]) -> None:
    """Every offset is where its token's text starts in ``text``; offsets never decrease."""
    assert len(offsets) == len(tokens)
    assert all(text[at:].startswith(t) for at, t in zip(offsets, tokens)), list(zip(offsets, tokens))
    assert offsets == sorted(offsets)
    assert all(at + len(t) == nxt for at, t, nxt in zip(offsets, tokens, offsets[1:]))


def test_chat_logprob_tokens_join_to_the_content(app, questions):
    for q in questions[:2]:
        choice = app.post("/v1/chat/completions", chat_body(q))["choices"][0]
        content, entries = choice["message"]["content"], choice["logprobs"]["content"]
        assert " " in content and entries
        assert "".join(e["token"] for e in entries) == content
        assert all(bytes(e["bytes"]).decode() == e["token"] and e["logprob"] <= 0 for e in entries)


def test_completion_logprob_tokens_join_to_the_text_and_offsets_index_it(app, prompt):
    body = app.post("/v1/completions", {"prompt": prompt, "temperature": 0, "logprobs": 0})
    choice, usage = body["choices"][0], body["usage"]
    lp, text = choice["logprobs"], choice["text"]
    assert " " in text and "".join(lp["tokens"]) == text
    check_offsets(text, lp["tokens"], lp["text_offset"])
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == usage["completion_tokens"]


def test_max_tokens_cut_lists_exactly_the_returned_tokens(app, prompt):
    body = app.post("/v1/completions", {"prompt": prompt, "temperature": 0, "logprobs": 0,
                                        "max_tokens": 3})
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert choice["finish_reason"] == "length" and len(lp["tokens"]) == 3 == body["usage"]["completion_tokens"]
    assert "".join(lp["tokens"]) == choice["text"]
    check_offsets(choice["text"], lp["tokens"], lp["text_offset"])


def test_a_stop_string_cut_lists_the_tokens_of_the_returned_text(app, questions):
    plain = app.post("/v1/chat/completions", chat_body(questions[0]))["choices"][0]["message"]["content"]
    words = plain.split()
    # one stop string starting on a token boundary, one starting inside a token (its last character)
    for stop in (f" {words[2]} ", words[1][-1:] + " " + words[2]):
        choice = app.post("/v1/chat/completions", chat_body(questions[0], stop=[stop]))["choices"][0]
        content = choice["message"]["content"]
        assert choice["finish_reason"] == "stop" and content == plain[: plain.index(stop)]
        assert "".join(e["token"] for e in choice["logprobs"]["content"]) == content


def stream_text_and_tokens(events: list[dict], chat: bool) -> tuple[str, list[str], list[int]]:
    text, tokens, offsets = "", [], []
    for event in events:
        for c in event.get("choices", []):
            piece = (c["delta"].get("content") or "") if chat else c["text"]
            lp = c["logprobs"]
            if lp is not None:
                chunk = [e["token"] for e in lp["content"]] if chat else lp["tokens"]
                assert "".join(chunk) == piece  # each chunk carries whole tokens
                tokens += chunk
                offsets += [] if chat else lp["text_offset"]
            text += piece
    return text, tokens, offsets


def test_streamed_chat_tokens_join_to_the_streamed_content(app, questions):
    events = app.post("/v1/chat/completions", chat_body(questions[1], stream=True))
    text, tokens, _ = stream_text_and_tokens(events, chat=True)
    plain = app.post("/v1/chat/completions", chat_body(questions[1]))["choices"][0]["message"]["content"]
    assert text == plain and "".join(tokens) == text


def test_streamed_completion_offsets_index_the_whole_text(app, prompt):
    body = {"prompt": prompt, "temperature": 0, "logprobs": 0, "max_tokens": 12}
    events = app.post("/v1/completions", dict(body, stream=True))
    text, tokens, offsets = stream_text_and_tokens(events, chat=False)
    assert text == app.post("/v1/completions", body)["choices"][0]["text"]
    assert "".join(tokens) == text and len(events) > 2
    check_offsets(text, tokens, offsets)


class _Bytes:
    """A byte-level tokenizer (one token per UTF-8 byte): characters split over several tokens."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_a_character_split_over_tokens_belongs_to_the_token_that_completes_it():
    ids = list("a é b €".encode())
    choice = ChoiceText(_Bytes(), 0, (), None, want_logprobs=True)
    deltas = [choice.update(ids[:k], [-0.1] * k, False, False) for k in range(1, len(ids))]
    deltas.append(choice.update(ids, [-0.1] * len(ids), True, True))
    sent = [d for d in deltas if d is not None]
    assert "".join(d.text for d in sent) == "a é b €"
    assert all("".join(d.token_texts) == d.text and len(d.token_texts) == len(d.token_ids) for d in sent)
    texts = choice.choice(nfe=1).token_texts
    assert "".join(texts) == "a é b €" and len(texts) == len(ids)
    assert texts[2:4] == ("", "é") and texts[-3:] == ("", "", "€")
