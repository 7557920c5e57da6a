"""Admission without Ray: the ingress's row reservation (a burst beyond capacity is refused before it is
tokenized), its queue budget, and a replica's row gate (a request that waits past its budget gets a 429 then)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import types
from types import SimpleNamespace

from serve_apps import protocol as P
from serve_apps.admission import Admission
from serve_apps.openai_app import OpenAIIngress


def _ingress(capacity: int, gate: threading.Event) -> SimpleNamespace:
    # The ingress's own request path on a bare namespace: no model, tokenizer or Serve replica.
    admission = Admission(capacity, rows_per_replica=capacity, budget_s=5.0, running=lambda: 1)
    ingress = SimpleNamespace(admission=admission, cpu=concurrent.futures.ThreadPoolExecutor(1))
    ingress._serve = types.MethodType(OpenAIIngress.func_or_class._serve, ingress)

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
        held = ingress.admission.rows_in_use
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
    assert ingress.admission.rows_in_use == 0  # the parsed-and-failed requests gave their rows back


def test_a_request_for_more_rows_than_are_free_is_refused_after_parsing_and_holds_nothing():
    gate = threading.Event()
    gate.set()
    ingress = _ingress(2, gate)
    ingress.admission.rows_in_use = 1  # one row taken by another request
    ingress._prepare = lambda raw, model_cls, chat: (SimpleNamespace(stream=False), [SimpleNamespace(n=2)], [])
    result = _serve_once(ingress)
    assert isinstance(result, P.APIError) and result.status == 429 and "needs 1" in result.message
    assert ingress.admission.rows_in_use == 1  # its provisional row came back; the other request's row is untouched


def test_a_refused_request_is_answered_without_reading_its_body():
    # Under Serve every body read is a call back to the proxy: a request refused for lack of rows skips it.
    ingress = _ingress(1, threading.Event())
    ingress.admission.rows_in_use = 1
    reads = []

    async def read_body(request) -> bytes:
        reads.append(request)
        return b"{}"

    ingress._read_body = read_body
    result = _serve_once(ingress)
    assert isinstance(result, P.APIError) and result.status == 429 and reads == []
    assert ingress.admission.rows_in_use == 1


def test_a_body_that_fails_to_read_gives_its_row_back():
    ingress = _ingress(2, threading.Event())

    async def read_body(request) -> bytes:
        raise P.APIError(413, "request body exceeds the limit")

    ingress._read_body = read_body
    result = _serve_once(ingress)
    assert isinstance(result, P.APIError) and result.status == 413 and ingress.admission.rows_in_use == 0


# ---------------------------------------------------------------- issue 33: the queue budget

def test_the_ingress_refuses_at_once_when_the_expected_wait_exceeds_the_budget():
    # 1 replica of 4 rows decoding, requests taking 2 s: each row queued beyond the 4 waits 0.5 s more.
    running = [1]
    adm = Admission(capacity=100, rows_per_replica=4, budget_s=3.0, running=lambda: running[0])
    releases = [adm.reserve(1) for _ in range(4)]
    assert adm.expected_wait_s() == 0.0  # nothing timed yet: only the count bound applies
    adm.observe(2.0)
    assert adm.expected_wait_s() == 0.5  # the 5th row waits for one of 4 rows, freed every 0.5 s
    # expected waits 0.5 s and 1.0 s: with one request's decode (2 s) of slack, within the budget
    releases += [adm.reserve(1), adm.reserve(1)]
    try:
        adm.reserve(1)  # 1.5 s + 2 s
    except P.APIError as e:
        refused = e
    assert refused.status == 429 and refused.code == "overloaded" and "queue budget of 3 s" in refused.message
    assert refused.headers()["Retry-After"] == "1"
    running[0] = 2  # a second replica came up: twice the rows decode, the same queue waits half as long
    releases.append(adm.reserve(1))
    assert adm.rows_in_use == 7
    for release in releases:
        release()
        release()  # idempotent
    assert adm.rows_in_use == 0


def test_a_request_past_its_budget_before_it_is_handed_on_gets_a_429():
    import time

    adm = Admission(capacity=10, rows_per_replica=1, budget_s=2.0, running=lambda: 1)
    adm.check_deadline(time.time() + 0.5)  # still within
    try:
        adm.check_deadline(time.time() - 0.3)
    except P.APIError as e:
        assert e.status == 429 and "waited 2.3 s" in e.message and e.headers()["Retry-After"]
    else:
        raise AssertionError("a request past its budget was handed on")


def _gate_times(gate, calls):
    """Run ``calls`` = [(n, budget_s, hold_s)] concurrently through ``gate``: each one's (outcome, seconds)."""
    import time

    from serve_apps.admission import GateClosed

    async def one(n, budget_s, hold_s):
        t0 = time.monotonic()
        try:
            await gate.enter(n, time.time() + budget_s)
        except GateClosed:
            return "refused", time.monotonic() - t0
        waited = time.monotonic() - t0
        await asyncio.sleep(hold_s)
        gate.leave(n)
        return "entered", waited

    async def run():
        tasks = []
        for call in calls:
            tasks.append(asyncio.ensure_future(one(*call)))
            await asyncio.sleep(0.01)  # arrival order
        return await asyncio.gather(*tasks)

    return asyncio.run(run())


def test_the_row_gate_serves_in_order_and_refuses_when_the_budget_runs_out():
    from serve_apps.admission import RowGate

    gate = RowGate(rows=2, max_waiting=3)
    out = _gate_times(gate, [(2, 1.0, 0.3), (1, 1.0, 0.1), (1, 0.15, 0.1), (1, 1.0, 0.1), (1, 1.0, 0.1)])
    (a, ta), (b, tb), (c, tc), (d, td), (e, te) = out
    assert a == b == "entered" and ta < 0.05 and 0.2 < tb < 0.5  # b waited for a's rows
    assert c == "refused" and 0.1 < tc < 0.3  # its budget ran out while it waited: refused then, not later
    assert d == "entered" and 0.2 < td < 0.5  # behind c in the line, entered beside b once c had left it
    assert e == "refused" and te < 0.05  # b, c and d were already waiting (max_waiting=3): refused at once
    assert gate.free == 2 and gate.waiting == 0


def test_a_caller_that_goes_away_at_the_gate_gives_its_place_and_rows_back():
    import time

    from serve_apps.admission import RowGate

    gate = RowGate(rows=1, max_waiting=4)

    async def run():
        await gate.enter(1, time.time() + 1)
        waiter = asyncio.ensure_future(gate.enter(1, time.time() + 5))
        await asyncio.sleep(0.05)
        assert gate.waiting == 1
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        gate.leave(1)

    asyncio.run(run())
    assert gate.free == 1 and gate.waiting == 0


class _SlowEngine:
    """The engine as a replica sees it: every request decodes for ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def check(self, req) -> None:
        pass

    def retry_after_s(self) -> float:
        return 1.0

    async def generate(self, req):
        await asyncio.sleep(self.seconds)
        return "output"


def test_a_replica_answers_429_when_a_request_waits_past_its_budget_for_a_row():
    """Before: a request beyond the rows waited in the engine's queue until its timeout (408) or its turn."""
    import time

    from serve_apps.admission import RowGate
    from serve_apps.config import ServeConfig
    from serve_apps.replica import D3LLMModel

    cfg = ServeConfig.from_preset("tiny", max_batch_size=1, max_queued_requests=4, queue_budget_s=0.3)
    replica = SimpleNamespace(cfg=cfg, engine=_SlowEngine(1.0), gate=RowGate(1, 4))
    for name in ("generate", "_enter"):
        setattr(replica, name, types.MethodType(getattr(D3LLMModel.func_or_class, name), replica))
    req = SimpleNamespace(n=1)

    async def run():
        t0 = time.monotonic()

        async def timed(coro):
            out = await coro
            return out, time.monotonic() - t0

        first = asyncio.ensure_future(timed(replica.generate(req, time.time() + cfg.queue_budget_s)))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(timed(replica.generate(req, time.time() + cfg.queue_budget_s)))
        late = await timed(replica.generate(req, time.time() - 1.0))  # reached the replica past its budget
        return await first, await second, late

    (ok, t_ok), (refused, t_refused), (late, t_late) = asyncio.run(run())
    assert ok == "output" and t_ok >= 1.0
    assert isinstance(refused, P.APIError) and refused.status == 429 and 0.25 < t_refused < 0.6, t_refused
    assert "queue budget 0.3 s" in refused.message and refused.headers()["Retry-After"] == "1"
    assert isinstance(late, P.APIError) and late.status == 429 and t_late < 0.1
    assert replica.gate.free == 1
