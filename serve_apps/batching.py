"""Continuous step-level batching on d3core's decode engine; asyncio front, one decode thread, no Ray.

Requests enter a bounded admission queue. A decode thread owns a
:class:`~d3core.samplers.engine.Decoder` (one per block length) and loops:

1. admit queued requests into free decoder rows (``n`` rows per request). ``batching`` names the
   policy: ``"continuous"`` admits at every step; ``"request"`` admits a batch only when the
   decoder is empty (request-level batching, a baseline for the benchmarks; the app's batching from
   before the step engine lives in ``benchmarks/legacy_engine.py``);
2. drop the rows of requests that were cancelled or passed their deadline;
3. run one decode step for every row at once (rows with different thresholds, temperatures and
   seeds share it: they are per-row parameters);
4. read the step's per-row outputs (:class:`~d3core.samplers.engine.RowOutput`: the answer tokens that
   became final and whether the answer ended; the engine reads nothing else of the decoder), turn them
   into text (:class:`~serve_apps.outputs.ChoiceText`), stream the new part, end rows at EOS, a stop
   string or ``max_tokens``, and answer finished requests.

Failures stay with their request: a request the decoder refuses, or whose output handling
raises, fails alone; a step that raises fails the rows in it, and the thread carries on with an
empty decoder. Overload is answered at once (:class:`~serve_apps.requests.EngineOverloaded`),
never by a wait. The requests, outputs and errors are defined in :mod:`serve_apps.requests`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import numpy as np
import torch

from d3core.samplers import get_sampler
from d3core.samplers import graphs as graph_modes
from d3core.samplers.base import validate_prompts
from d3core.samplers.engine import Decoder, Program, Row, RowOutput
from serve_apps.outputs import ChoiceText, Delta
from serve_apps.requests import (
    EngineClosed,
    EngineMetrics,
    EngineOverloaded,
    EngineTimeout,
    GenerationOutput,
    GenerationRequest,
    RequestFailed,
)

logger = logging.getLogger(__name__)

SEED_SPACE = 2**63  # row seeds are int64; request seeds are validated to this range by the protocol
BATCHING = ("continuous", "request")  # admission policies (see the module docstring)


@dataclass(eq=False)
class _Item:
    req: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrived: float
    deadline: float
    cancelled: bool = False
    admitted: float = 0.0
    rows: list[Row] = field(default_factory=list)
    texts: list[ChoiceText] = field(default_factory=list)
    done: bool = False
    batch_size: int = 0

    def post(self, event: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the client's loop is gone: nobody to tell
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class ContinuousEngine:
    """Step-level batching for one model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, sampler: str = "d3llm", max_batch_size: int = 16,
                 max_queued: int = 256, batching: str = "continuous", batch_wait_timeout_s: float = 0.0,
                 metrics: EngineMetrics | None = None, stall_timeout_s: float = 120.0,
                 program_factory: Callable[[], Program] | None = None, capacity: int | None = None,
                 graphs: bool | str | None = None, buckets: bool | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}: must be >= 1 (1 turns batching off)")
        if max_queued < 1:
            raise ValueError(f"max_queued={max_queued}: must be >= 1 (the admission queue bound)")
        if batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s={batch_wait_timeout_s}: must be >= 0")
        if batching not in BATCHING:
            raise ValueError(f"batching={batching!r}: must be one of {BATCHING} (continuous unless benchmarking)")
        spec = get_sampler(sampler)
        if spec.autoregressive or spec.needs_verifier:
            raise ValueError(f"sampler={sampler!r}: serving needs a dLLM sampler without a verifier")
        self.model, self.tokenizer = model, tokenizer
        self.sampler = sampler
        self._program_factory = program_factory or _program_for(sampler)
        self._program = self._program_factory()  # the contract's host questions (segment length, joins)
        if not self._program.joins_mid_run:
            raise ValueError(f"sampler={sampler!r}: its program cannot take rows between steps "
                             "(Program.joins_mid_run is False), which step-level batching needs")
        self.max_batch_size, self.max_queued = max_batch_size, max_queued
        self.batching, self.batch_wait_timeout_s = batching, batch_wait_timeout_s
        self.metrics, self.stall_timeout_s = metrics, stall_timeout_s
        cfg = model.config
        if capacity is not None and not 0 < capacity <= cfg.max_seq_len:
            raise ValueError(f"capacity={capacity}: must lie in (0, {cfg.max_seq_len}] (the model's context)")
        self._capacity = capacity or cfg.max_seq_len
        # Resolved now, so that a bad mode fails the constructor rather than the decode thread.
        self._graphs = graph_modes.resolve(graphs, next(model.parameters()).device)
        self._buckets = buckets
        self._decoders: dict[int, Decoder] = {}
        self._owner: dict[Row, tuple[_Item, int]] = {}
        self._pending: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._beat = time.monotonic()
        self._step_s = 0.0
        self.stats = {"requests": 0, "steps": 0, "rows_admitted": 0, "timeouts": 0, "cancelled": 0, "failed": 0,
                      "overloaded": 0, "tokens": 0, "max_batch": 0}
        self._thread = threading.Thread(target=self._run, name="d3ray-decode", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ request side
    def check(self, req: GenerationRequest) -> None:
        """Raise ValueError now if the model cannot decode ``req`` (empty or too long prompt, bad ids, n)."""
        cfg = self.model.config
        validate_prompts([req.prompt_ids], req.params.gen_length, self._capacity, cfg.vocab_size)
        if req.n > self.max_batch_size:
            raise ValueError(f"n={req.n} exceeds this deployment's max_batch_size {self.max_batch_size}: "
                             "ask for fewer completions per request")

    async def generate(self, req: GenerationRequest) -> GenerationOutput:
        async with contextlib.aclosing(self._events(req, stream=False)) as events:
            async for event in events:
                if isinstance(event, GenerationOutput):
                    return event
        raise EngineClosed("the engine stopped before the request finished")

    async def stream(self, req: GenerationRequest) -> AsyncIterator[Delta | GenerationOutput]:
        """Yields :class:`Delta` s of newly final text, then the :class:`GenerationOutput`."""
        async with contextlib.aclosing(self._events(req, stream=True)) as events:
            async for event in events:
                yield event

    async def _events(self, req: GenerationRequest, stream: bool) -> AsyncIterator[Any]:
        item = self.submit(req)
        status = "cancelled"
        try:
            while True:
                event = await item.queue.get()
                if isinstance(event, BaseException):
                    status = "timeout" if isinstance(event, EngineTimeout) else "error"
                    raise event
                if isinstance(event, GenerationOutput):
                    status = "ok"
                    yield event
                    return
                if stream:
                    yield event
        finally:
            if status == "cancelled":
                self.cancel(item)
            self._observe_request(status, None)

    def submit(self, req: GenerationRequest) -> _Item:
        """Queue ``req`` (ValueError if it cannot be decoded, EngineOverloaded if the queue is full)."""
        if self._closed:
            raise EngineClosed("the engine was shut down")
        self.check(req)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        item = _Item(req, loop, asyncio.Queue(), now, now + req.timeout_s)
        with self._cond:
            free = max(self.max_batch_size - len(self._owner), 0)  # rows the next step boundary can fill
            waiting = sum(it.req.n for it in self._pending)
            if waiting + req.n > free + self.max_queued:
                self.stats["overloaded"] += 1
                raise EngineOverloaded(f"{len(self._pending)} requests are already queued (max_queued="
                                       f"{self.max_queued}): retry shortly", self.retry_after_s())
            self._pending.append(item)
            self.stats["requests"] += 1
            self._cond.notify()
        return item

    def cancel(self, item: _Item) -> None:
        with self._cond:
            item.cancelled = True
            self._cond.notify()

    def retry_after_s(self) -> float:
        """A client's fair wait before retrying: about one request's decode time, at least a second."""
        return max(1.0, round(self._step_s * 32, 1))

    @property
    def alive(self) -> bool:
        """The decode thread runs and has made progress recently (or has nothing to do)."""
        if self._closed or not self._thread.is_alive():
            return False
        busy = bool(self._owner or self._pending)
        return not busy or time.monotonic() - self._beat < self.stall_timeout_s

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._owner)

    async def close(self) -> None:
        with self._cond:
            self._closed = True
            pending, self._pending = list(self._pending), collections.deque()
            self._cond.notify()
        for item in pending:
            item.post(EngineClosed("the engine was shut down"))
        await asyncio.to_thread(self._thread.join, 10.0)

    # ------------------------------------------------------------------ decode thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._pending and not self._owner:
                    self._beat = time.monotonic()
                    self._cond.wait(timeout=1.0)
                if self._closed:
                    break
            self._beat = time.monotonic()
            try:
                self._admit()
                self._expire()
                for seg in list(self._decoders):
                    if self._decoders[seg].rows:
                        self._step(seg)
            except Exception:  # a bug outside any one request: fail what is running, keep serving
                logger.exception("decode loop error; failing the running requests")
                for item in {owner for owner, _ in self._owner.values()}:
                    self._fail(item, RequestFailed("internal decode error: retry"))
                self._decoders.clear()
                self._owner.clear()
        for item in {owner for owner, _ in self._owner.values()}:
            item.post(EngineClosed("the engine was shut down"))

    def _admit(self) -> None:
        continuous = self.batching == "continuous"
        if not continuous and any(d.rows for d in self._decoders.values()):
            return
        if not continuous and self.batch_wait_timeout_s > 0:
            with self._cond:
                head = self._pending[0] if self._pending else None
            if head is not None and len(self._pending) < self.max_batch_size:
                wait = head.arrived + self.batch_wait_timeout_s - time.monotonic()
                if wait > 0:
                    time.sleep(min(wait, self.batch_wait_timeout_s))
        self._admit_batch()

    def _admit_batch(self) -> None:
        """Start queued requests, first come first served, while their rows fit."""
        free = self.max_batch_size - len(self._owner)
        while free > 0:
            with self._cond:
                if not self._pending:
                    return
                item = self._pending[0]
                if item.cancelled or time.monotonic() > item.deadline:
                    self._pending.popleft()
                    self._gone(item)
                    continue
                if item.req.n > free:
                    return  # first come, first served: wait for rows to free up
                self._pending.popleft()
            free -= self._start(item)

    def _start(self, item: _Item) -> int:
        req = item.req
        try:
            decoder = self._decoder_for(req.params)
            base = req.seed if req.seed is not None else int(np.random.default_rng().integers(SEED_SPACE))
            for i in range(req.n):
                row = decoder.add(req.prompt_ids, req.params, seed=(base + i) % SEED_SPACE, tag=item)
                item.rows.append(row)
                item.texts.append(ChoiceText(self.tokenizer, i, req.stop, req.max_tokens, req.logprobs))
                self._owner[row] = (item, i)
        except Exception as e:  # the decoder refused this request: it alone fails
            logger.warning("request %s refused by the decoder: %r", req.request_id or "?", e)
            self._fail(item, e if isinstance(e, ValueError) else RequestFailed(f"could not start: {e}"))
            return 0
        item.admitted = time.monotonic()
        self.stats["rows_admitted"] += req.n
        return req.n

    def _decoder_for(self, params) -> Decoder:
        seg = self._program.segment_length(params)
        if seg not in self._decoders:
            self._decoders[seg] = Decoder(self.model, self._program_factory(), rows=self.max_batch_size,
                                          capacity=self._capacity, graphs=self._graphs, buckets=self._buckets,
                                          emit_outputs=True)
        return self._decoders[seg]

    def _expire(self) -> None:
        now = time.monotonic()
        for item in {owner for owner, _ in self._owner.values()}:
            if item.cancelled or now > item.deadline:
                self._gone(item)

    def _gone(self, item: _Item) -> None:
        """A cancelled or expired request leaves: its rows are dropped, its caller told if it waits."""
        self._release(item)
        if item.cancelled:
            self.stats["cancelled"] += 1
        else:
            self.stats["timeouts"] += 1
            item.post(EngineTimeout(f"request {item.req.request_id or '?'} did not finish within "
                                    f"{item.req.timeout_s} s"))
        item.done = True

    def _release(self, item: _Item) -> None:
        for row in item.rows:
            self._owner.pop(row, None)
            for d in self._decoders.values():
                d.cancel(row)

    def _fail(self, item: _Item, error: BaseException) -> None:
        self._release(item)
        self.stats["failed"] += 1
        item.done = True
        item.post(error)

    def _step(self, seg: int) -> None:
        decoder = self._decoders[seg]
        rows = len(decoder.rows)
        started = time.perf_counter()
        try:
            report = decoder.step()
        except Exception as e:  # the step's rows fail; the thread and other decoders carry on
            logger.exception("decode step failed for %d rows", rows)
            for item in {self._owner[r][0] for r in decoder.rows if r in self._owner}:
                self._fail(item, RequestFailed(f"decode step failed ({type(e).__name__}: {e}): retry"))
            del self._decoders[seg]
            return
        seconds = time.perf_counter() - started
        if report.forwarded:
            self.stats["steps"] += 1
            self.stats["max_batch"] = max(self.stats["max_batch"], rows)
            self._step_s = 0.9 * self._step_s + 0.1 * seconds if self._step_s else seconds
        for row in list(decoder.rows) + report.finished:
            if row in self._owner:
                item = self._owner[row][0]
                item.batch_size = max(item.batch_size, rows)
        committed = 0
        for out in report.outputs:
            owner = self._owner.get(out.row)
            if owner is None:
                continue
            item, index = owner
            try:
                committed += self._deliver(decoder, item, index, out)
            except RequestFailed as e:
                self._fail(item, e)
            except Exception as e:  # this request's output handling broke: it alone fails
                logger.exception("output handling failed for request %s", item.req.request_id or "?")
                self._fail(item, RequestFailed(f"could not produce the output ({type(e).__name__}): retry"))
        self.stats["tokens"] += committed
        if self.metrics is not None and report.forwarded:
            with contextlib.suppress(Exception):  # metrics never take the scheduler down
                self.metrics.on_step(rows, seconds, committed)

    # A row whose text is final (max_tokens or a stop string) leaves the decoder at once. The benchmarks'
    # legacy engine keeps such rows decoding to their end, as the app did before the step engine.
    STOP_ROWS_AT_TEXT_END = True

    def _deliver(self, decoder: Decoder, item: _Item, index: int, out: RowOutput) -> int:
        """One row's step output into its choice's text: stream the new part, end the row or the request."""
        if item.done:
            return 0
        if out.finish_reason == "error" and out.ended:
            raise RequestFailed(out.row.error or "the decoder ended the row")
        text, row = item.texts[index], out.row
        before = len(text.ids)
        # An EOS with nothing undecided before it makes the answer final even while the sampler still
        # fills slots after it (committed tokens never change).
        delta = text.extend(out.token_ids, out.logprobs, out.finished, out.finish_reason == "stop")
        if delta is not None and delta.text:
            item.post(delta)
        if text.finish_reason is not None and not out.ended:
            if not self.STOP_ROWS_AT_TEXT_END:
                return max(len(text.ids) - before, 0)
            decoder.cancel(row)  # max_tokens, a stop string or an EOS: no more decoding for this row
        if text.finish_reason is not None:
            self._owner.pop(row, None)
            if all(t.finish_reason is not None for t in item.texts):
                self._finish(item)
        return max(len(text.ids) - before, 0)

    def _finish(self, item: _Item) -> None:
        item.done = True
        now = time.monotonic()
        choices = tuple(t.choice(r.nfe, r.computed, _committed(r, self.model.config.mask_id))
                        for t, r in zip(item.texts, item.rows))
        out = GenerationOutput(choices, len(item.req.prompt_ids), item.batch_size, item.admitted - item.arrived,
                               now - item.admitted)
        self._observe_request("ok", out)
        item.post(out)

    def _observe_request(self, status: str, out: GenerationOutput | None) -> None:
        if self.metrics is not None and (status != "ok" or out is not None):
            with contextlib.suppress(Exception):
                self.metrics.on_request(status, out)


def _committed(row: Row, mask_id: int) -> int:
    """Generation slots a row committed before it ended (all of them unless it left early); 0 while it
    still decodes (a row the benchmarks' legacy engine keeps decoding after its text is final)."""
    if row.result is None:
        return 0
    return int(np.count_nonzero(np.asarray(row.result.tokens) != mask_id))


def _program_for(sampler: str) -> Callable[[], Program]:
    from d3core.samplers import d3llm, dparallel, fast_dllm, vanilla

    programs = {"d3llm": d3llm.D3LLMProgram, "fast_dllm": fast_dllm.FastDLLMProgram,
                "dparallel": dparallel.DParallelProgram, "vanilla": vanilla.VanillaProgram}
    if sampler not in programs:
        raise ValueError(f"sampler={sampler!r} has no engine program: choose one of {sorted(programs)}")
    return programs[sampler]
