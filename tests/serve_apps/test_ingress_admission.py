"""The ingress's row reservation, without Ray: a burst beyond capacity is refused before it is tokenized."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import types
from types import SimpleNamespace

from serve_apps import protocol as P
from serve_apps.openai_app import OpenAIIngress


def _ingress(capacity: int, gate: threading.Event) -> SimpleNamespace:
    # The ingress's own admission methods on a bare namespace: no model, tokenizer or Serve replica.
    ingress = SimpleNamespace(capacity=capacity, rows_in_use=0, cpu=concurrent.futures.ThreadPoolExecutor(1))
    cls = OpenAIIngress.func_or_class
    for name in ("_serve", "_reserve", "_overloaded"):
        setattr(ingress, name, types.MethodType(getattr(cls, name), ingress))

    async def read_body(request) -> bytes:
        return b"{}"

    def prepare(raw, model_cls, chat):
        gate.wait(10)  # the tokenizer thread is busy until the test lets it go
        raise P.APIError(400, "parsed: stop here")

    ingress._read_body, ingress._prepare = read_body, prepare
    return ingress


def _serve_once(ingress: SimpleNamespace):
    """One request through ``_serve``: its result, or the APIError it was answered with."""
    try:
        return asyncio.run(ingress._serve("request", None, True))
    except P.APIError as e:
        return e
    finally:
        ingress.cpu.shutdown()


def test_a_burst_beyond_capacity_is_refused_while_the_tokenizer_is_busy():
    gate = threading.Event()
    ingress = _ingress(3, gate)

    async def burst():
        tasks = [asyncio.ensure_future(ingress._serve(None, None, True)) for _ in range(10)]
        await asyncio.sleep(0.3)
        early = [t for t in tasks if t.done()]
        held = ingress.rows_in_use
        gate.set()
        return early, held, await asyncio.gather(*tasks, return_exceptions=True)

    try:
        early, held, results = asyncio.run(burst())
    finally:
        gate.set()
        ingress.cpu.shutdown()
    # 7 answered before any request was parsed, each with a 429; 3 rows held by the requests in the tokenizer queue
    assert len(early) == 7 and held == 3
    assert all(isinstance(t.exception(), P.APIError) and t.exception().status == 429 for t in early)
    assert sorted(e.status for e in results) == [400] * 3 + [429] * 7
    assert ingress.rows_in_use == 0  # the parsed-and-failed requests gave their rows back


def test_a_request_for_more_rows_than_are_free_is_refused_after_parsing_and_holds_nothing():
    gate = threading.Event()
    gate.set()
    ingress = _ingress(2, gate)
    ingress.rows_in_use = 1  # one row taken by another request
    ingress._prepare = lambda raw, model_cls, chat: (SimpleNamespace(stream=False), [SimpleNamespace(n=2)], [])
    result = _serve_once(ingress)
    assert isinstance(result, P.APIError) and result.status == 429 and "needs 1" in result.message
    assert ingress.rows_in_use == 1  # its provisional row came back; the other request's row is untouched


def test_a_refused_request_is_answered_without_reading_its_body():
    # Under Serve every body read is a call back to the proxy: a request refused for lack of rows skips it.
    ingress = _ingress(1, threading.Event())
    ingress.rows_in_use = 1
    reads = []

    async def read_body(request) -> bytes:
        reads.append(request)
        return b"{}"

    ingress._read_body = read_body
    result = _serve_once(ingress)
    assert isinstance(result, P.APIError) and result.status == 429 and reads == []
    assert ingress.rows_in_use == 1


def test_a_body_that_fails_to_read_gives_its_row_back():
    ingress = _ingress(2, threading.Event())

    async def read_body(request) -> bytes:
        raise P.APIError(413, "request body exceeds the limit")

    ingress._read_body = read_body
    result = _serve_once(ingress)
    assert isinstance(result, P.APIError) and result.status == 413 and ingress.rows_in_use == 0
