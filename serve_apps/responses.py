"""OpenAI response bodies from engine outputs (one JSON body, or a server-sent event stream) and their parts.

The parts come first: ids, ``usage`` with d3ray's cost figures, choices, chunks, ``logprobs``
objects and the SSE framing. Both endpoints share these: ``chat`` picks the chat shapes
(``choices[i].message`` / ``delta``) over the completion ones (``choices[i].text``). A request's
prompts each decode ``n`` rows, so the choice index of prompt ``i``'s ``j``-th completion is
``i * n + j``, as vLLM numbers them.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator, Callable, Sequence

from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException

from serve_apps import protocol as P
from serve_apps.outputs import Delta
from serve_apps.replica import engine_error
from serve_apps.requests import GenerationOutput
from serve_apps.text import decode_prompt


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, nfe: int, batch_size: int, tokens_computed: int = 0,
          tokens_committed: int = 0) -> dict[str, Any]:
    """OpenAI's usage plus d3ray's cost figures: NFE, TPF, the batch, and token-forwards per committed token
    (window tokens the model recomputed / generation slots committed: device-independent)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "nfe": nfe,
            "tpf": round(completion_tokens / max(nfe, 1), 4), "batch_size": batch_size,
            "tokens_computed": tokens_computed,
            "token_forwards_per_token": round(tokens_computed / max(tokens_committed, 1), 4)}


def completion_logprobs(tokens: list[str], logprobs: list[float], offset: int) -> dict[str, Any]:
    """The completions ``logprobs`` object for the chosen tokens (``text_offset`` from ``offset``)."""
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": offsets}


def chat_logprobs(tokens: list[str], logprobs: list[float]) -> dict[str, Any]:
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")), "top_logprobs": []}
                        for t, lp in zip(tokens, logprobs)], "refusal": None}


def completion_body(rid: str, model: str, choices: list[dict], use: dict | None, chunk: bool = False) -> dict:
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices}
    if not chunk or use is not None:
        body["usage"] = use
    return body


def completion_choice(index: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def chat_body(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def chat_choice(index: int, text: str, finish: str, logprobs: dict | None = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish}


def chat_chunk(rid: str, model: str, choices: list[dict], use: dict | None = None) -> dict:
    body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices}
    if use is not None:
        body["usage"] = use
    return body


def chat_delta(index: int, delta: dict, finish: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _usage(outs: list[GenerationOutput]) -> dict[str, Any]:
    return usage(sum(o.prompt_tokens for o in outs), sum(o.completion_tokens for o in outs),
                 sum(o.nfe for o in outs), max(o.batch_size for o in outs), sum(o.tokens_computed for o in outs),
                 sum(o.tokens_committed for o in outs))


def _logprobs(texts: Sequence[str] | None, logprobs: Sequence[float] | None, chat: bool, offset: int) -> dict | None:
    """The ``logprobs`` object of a choice or delta: ``texts`` are its tokens' texts, starting at ``offset``."""
    if logprobs is None:
        return None
    texts, logprobs = list(texts), list(logprobs)
    return chat_logprobs(texts, logprobs) if chat else completion_logprobs(texts, logprobs, offset)


def response_body(tokenizer: Any, outs: list[GenerationOutput], req: Any, prompts: list, chat: bool) -> dict:
    """The whole answer of a non-streaming request (``echo`` prepends each prompt's text)."""
    choices = []
    for i, out in enumerate(outs):
        echo = decode_prompt(tokenizer, prompts[i]) if getattr(req, "echo", False) else ""
        for c in out.choices:
            lp = _logprobs(c.token_texts, c.logprobs, chat, len(echo))
            index = i * req.n + c.index
            choices.append(chat_choice(index, c.text, c.finish_reason, lp) if chat else
                           completion_choice(index, echo + c.text, c.finish_reason, lp))
    if chat:
        return chat_body(new_id("chatcmpl"), req.model, choices, _usage(outs))
    return completion_body(new_id("cmpl"), req.model, choices, _usage(outs))


class EventStream:
    """The SSE body of a streaming request over its prompts' model streams (one per prompt).

    Sends the opening chunks (the assistant role; ``echo``'s prompt text), then each stream's
    deltas as they come, a finishing chunk per choice, the usage chunk when asked, and
    ``[DONE]``. A failure mid-stream becomes an error event followed by ``[DONE]`` (the status
    line has gone out already). ``on_output`` sees each prompt's finished output (metrics, the
    admission's seconds per request). ``release`` runs exactly once however the stream ends, and
    streams still open are cancelled.
    """

    def __init__(self, tokenizer: Any, on_output: Callable[[GenerationOutput], None], streams: list, deadline: float,
                 req: Any, prompts: list, chat: bool, release: Callable[[], None]) -> None:
        self.tokenizer, self.on_output = tokenizer, on_output
        self.streams, self.deadline = streams, deadline
        self.req, self.prompts, self.chat, self.release = req, prompts, chat, release
        self.rid = new_id("chatcmpl" if chat else "cmpl")

    async def events(self) -> AsyncIterator[str]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, events) -> None:
            try:
                async for event in events:
                    await queue.put((i, event))
            except (RayError, RayServeException) as e:
                await queue.put((i, engine_error(e)))
            await queue.put((i, None))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(self.streams)]
        outs: dict[int, GenerationOutput] = {}
        ended, failed = 0, False
        try:
            for chunk in self._opening():
                yield chunk
            while ended < len(self.streams):
                try:
                    timeout = max(self.deadline - time.monotonic(), 0.0)
                    i, event = await asyncio.wait_for(queue.get(), timeout=timeout)
                except asyncio.TimeoutError:
                    raise P.APIError(408, "request did not finish within its timeout", type="timeout_error",
                                     code="request_timeout") from None
                if event is None:
                    ended += 1
                    if i not in outs:
                        raise P.APIError(503, "the model closed the stream early: retry",
                                         type="service_unavailable_error", code="unavailable")
                    continue
                if isinstance(event, P.APIError):
                    raise event
                if isinstance(event, GenerationOutput):
                    outs[i] = event
                    self.on_output(event)
                    for c in event.choices:
                        yield self._chunk(i * self.req.n + c.index, "", c.finish_reason, None)
                elif isinstance(event, Delta):
                    lp = _logprobs(event.token_texts, event.logprobs, self.chat, event.text_offset)
                    yield self._chunk(i * self.req.n + event.index, event.text, None, lp)
            if self.req.include_usage:
                use = _usage(list(outs.values()))
                yield sse(chat_chunk(self.rid, self.req.model, [], use) if self.chat else
                          completion_body(self.rid, self.req.model, [], use, chunk=True))
            yield sse("[DONE]")
        except P.APIError as e:
            failed = True
            yield sse(e.body())
            yield sse("[DONE]")
        finally:
            self.release()
            for t in tasks:
                t.cancel()
            if failed or ended < len(self.streams):
                for s in self.streams:
                    s.cancel()

    def _opening(self) -> list[str]:
        req, n, chunks = self.req, self.req.n, []
        for i, prompt in enumerate(self.prompts):
            for j in range(n):
                if self.chat:
                    delta = chat_delta(i * n + j, {"role": "assistant", "content": ""}, None)
                    chunks.append(sse(chat_chunk(self.rid, req.model, [delta])))
                elif getattr(req, "echo", False):
                    choice = completion_choice(i * n + j, decode_prompt(self.tokenizer, prompt), None)
                    chunks.append(sse(completion_body(self.rid, req.model, [choice], None, chunk=True)))
        return chunks

    def _chunk(self, index: int, text: str, finish: str | None, lp: dict | None) -> str:
        if self.chat:
            delta = {"content": text} if text else {}
            return sse(chat_chunk(self.rid, self.req.model, [chat_delta(index, delta, finish, lp)]))
        return sse(completion_body(self.rid, self.req.model, [completion_choice(index, text, finish, lp)],
                                   None, chunk=True))
