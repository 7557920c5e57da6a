"""Admission: how long a request may wait for a decoder row, and who says no.

A request waits for a decoder row in up to four places: Serve's proxy queue (before the ingress),
the ingress's tokenizer thread, Serve's router queue (before a model replica), and the replica.
Each is bounded by one budget, ``ServeConfig.queue_budget_s``, counted from the request's arrival
at the ingress:

* the proxy queue stays empty: the ingress takes every connection at once (``ingress_options``);
* :class:`Admission` (ingress) refuses at once, before the body is read, when every replica's rows
  and queue places are taken or when the expected wait for a row exceeds the budget (see
  :meth:`Admission.expected_wait_s`);
* a request still in the tokenizer's or the router's queue when its budget runs out is refused
  where it is found (the ingress after tokenizing, the replica on arrival);
* :class:`RowGate` (replica) hands rows to the engine first come, first served, at most a batch at
  once, and refuses a request whose budget runs out while it waits, at that moment.

So the engine's own admission queue never holds more than a step boundary's worth, and every
request is decoding or answered with a 429 (``Retry-After``) by the time its budget is spent.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable

from serve_apps import protocol as P

REQUEST_S_WEIGHT = 0.2  # weight of the newest request in the running mean of seconds per request
RATE_WINDOW_S = 5.0  # completions counted for the rows-per-second rate


def overloaded(message: str, retry_after_s: float) -> P.APIError:
    return P.APIError(429, f"server overloaded: {message}: retry after {math.ceil(retry_after_s)} s",
                      type="rate_limit_error", code="overloaded", retry_after_s=max(1.0, retry_after_s))


class Admission:
    """The ingress's decoder rows in flight, bounded by count (``capacity``) and by expected wait (``budget_s``).

    ``running`` gives the model replicas running now (the controller's view, refreshed in the
    background): their rows decode at once, the rest of ``rows_in_use`` queue.
    """

    def __init__(self, capacity: int, rows_per_replica: int, budget_s: float, running: Callable[[], int]) -> None:
        self.capacity, self.rows_per_replica, self.budget_s = capacity, rows_per_replica, budget_s
        self.running = running
        self.rows_in_use = 0
        self.request_s: float | None = None  # running mean of a request's decode seconds (None: none seen yet)
        self._done: collections.deque[tuple[float, int]] = collections.deque()  # (monotonic time, rows) finished
        self._busy_since = time.monotonic()  # when rows_in_use last rose from 0

    def expected_wait_s(self, rows: int = 1) -> float:
        """Seconds until ``rows`` more would start decoding (0 while rows are free or nothing was timed yet).

        The larger of two estimates. The engines': the rows queued ahead beyond those decoding, times
        the recent seconds per request, over the rows decoding (rows leave at that rate when the
        engines are the bottleneck). And Little's law on what actually finished in the last
        ``RATE_WINDOW_S`` (once at least a batch of rows did): the rows in flight over the rows finished
        per second, less one request's decode. The second catches a bottleneck before the engines
        (e.g. the ingress and proxy on a CPU shared with decoding), where rows wait to be handed on.
        """
        decoding = max(self.running(), 1) * self.rows_per_replica
        in_flight = self.rows_in_use + rows
        if in_flight <= decoding or self.request_s is None:
            return 0.0
        wait = (in_flight - decoding) * self.request_s / decoding
        rate = self.rows_per_s(min_rows=decoding)
        if rate is not None:
            wait = max(wait, in_flight / rate - self.request_s)
        return wait

    def rows_per_s(self, min_rows: int = 1) -> float | None:
        """Rows finished per second over the last ``RATE_WINDOW_S`` of this busy period (None: fewer than
        ``min_rows`` finished in it, or it is younger than a second)."""
        now = time.monotonic()
        start = max(now - RATE_WINDOW_S, self._busy_since)
        while self._done and self._done[0][0] < now - RATE_WINDOW_S:
            self._done.popleft()
        finished = sum(rows for at, rows in self._done if at >= start)
        return finished / (now - start) if finished >= min_rows and now - start >= 1.0 else None

    def reserve(self, rows: int) -> Callable[[], None]:
        """Take ``rows`` or raise a 429; returns the release (idempotent).

        Refused: beyond ``capacity`` rows, or when a row would not free up within the budget less one
        request's decode time (the estimate's error; a request that finds a row free never waits).
        """
        if self.rows_in_use + rows > self.capacity:
            raise overloaded(f"{self.rows_in_use} of {self.capacity} decoder rows and queue places are taken and "
                             f"this request needs {rows}", self.retry_after_s())
        wait = self.expected_wait_s(rows)
        # Rows free up as whole requests finish, so the estimate is good to about one request's decode:
        # a request may queue only if that much is left of the budget beyond its expected wait.
        if wait > 0 and wait + self.request_s > self.budget_s:
            raise overloaded(f"a decoder row would free up in about {wait:.1f} s, too close to the queue budget of "
                             f"{self.budget_s:g} s", max(1.0, wait + self.request_s - self.budget_s))
        if self.rows_in_use == 0:
            self._busy_since = time.monotonic()
        self.rows_in_use += rows
        held = [rows]

        def release() -> None:
            self.rows_in_use -= held.pop() if held else 0

        return release

    def retry_after_s(self) -> float:
        """A fair wait before retrying: about one request's decode time, at least a second."""
        return max(1.0, self.request_s or 1.0)

    def observe(self, decode_s: float, rows: int = 1) -> None:
        """A request of ``rows`` rows finished decoding in ``decode_s`` seconds."""
        self._done.append((time.monotonic(), rows))
        if decode_s > 0:
            old = self.request_s
            self.request_s = decode_s if old is None else (1 - REQUEST_S_WEIGHT) * old + REQUEST_S_WEIGHT * decode_s

    def check_deadline(self, admit_by: float) -> None:
        """A 429 if the budget (wall-clock ``admit_by``) ran out before the request could be handed on."""
        late = time.time() - admit_by
        if late > 0:
            raise overloaded(f"the request waited {self.budget_s + late:.1f} s for the ingress, beyond the queue "
                             f"budget of {self.budget_s:g} s", self.retry_after_s())


class GateClosed(Exception):
    """The gate refused a request: its budget ran out, or too many wait already."""

    def __init__(self, message: str, waited_s: float) -> None:
        super().__init__(message)
        self.waited_s = waited_s


class RowGate:
    """A replica's decoder rows, handed out first come, first served (one event loop; no locks).

    ``enter(n, admit_by)`` returns once ``n`` rows are free and every earlier request has its
    rows, or raises :class:`GateClosed` the moment the wall-clock ``admit_by`` passes (at once if
    it has passed, or if ``max_waiting`` requests wait already). ``leave(n)`` gives rows back.
    """

    def __init__(self, rows: int, max_waiting: int) -> None:
        if rows < 1 or max_waiting < 0:
            raise ValueError(f"RowGate(rows={rows}, max_waiting={max_waiting}): rows must be >= 1, max_waiting >= 0")
        self.rows, self.max_waiting = rows, max_waiting
        self.free = rows
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def enter(self, n: int, admit_by: float) -> None:
        if n > self.rows:
            raise ValueError(f"a request for {n} rows can never pass a gate of {self.rows}")
        if not self._waiters and n <= self.free:
            self.free -= n
            return
        started = time.time()
        if admit_by <= started:
            raise GateClosed("the request reached the replica after its queue budget ran out", 0.0)
        if len(self._waiters) >= self.max_waiting:
            raise GateClosed(f"{len(self._waiters)} requests already wait for decoder rows", 0.0)
        entry = (n, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            done, _ = await asyncio.wait({entry[1]}, timeout=admit_by - started)
        except BaseException:  # cancelled (the caller went away): keep the rows if they were granted meanwhile
            self._leave_line(entry)
            raise
        if not done:
            self._leave_line(entry)
            raise GateClosed("no decoder row freed up within the queue budget", time.time() - started)

    def leave(self, n: int) -> None:
        self.free += n
        self._wake()

    def _leave_line(self, entry: tuple[int, asyncio.Future]) -> None:
        if entry[1].done() and not entry[1].cancelled():  # granted: give the rows back
            self.leave(entry[0])
            return
        entry[1].cancel()
        self._waiters.remove(entry)
        self._wake()  # a smaller request behind this one may fit now

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.free:
            n, future = self._waiters.popleft()
            self.free -= n
            future.set_result(None)
