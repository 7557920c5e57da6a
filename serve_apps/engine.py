"""Dynamic batching decoder around a d3core sampler; asyncio only, no Ray Serve dependency.

Concurrent requests queue in one engine; a scheduler task forms a batch from the oldest request
and every queued request that shares its decoding parameters (a sampler decodes a batch with
one parameter set), waits up to ``batch_wait_timeout_s`` for the batch to fill, and decodes it on
a single worker thread so the event loop stays free. Streaming requests receive, after every
decoding step, the newly committed tokens of their row: the contiguous committed prefix before
the first mask or EOS, which no later step can change. Every request has a deadline; a request
whose deadline passes gets :class:`EngineTimeout`, and a batch in which every request has
gone (timed out or cancelled) is abandoned mid-decode.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol, Sequence

import torch

from d3core.samplers import get_sampler
from d3core.samplers.base import validate_prompts

logger = logging.getLogger(__name__)


class EngineTimeout(Exception):
    """The request passed its deadline before it finished."""


class EngineClosed(Exception):
    """The engine was shut down."""


class _Abandoned(Exception):
    """Raised inside the step hook when nobody waits for the batch any more."""


@dataclass(frozen=True)
class GenerationRequest:
    """One decode: prompt ids, the sampler's (hashable, validated) parameters and limits."""

    prompt_ids: tuple[int, ...]
    params: Any
    max_tokens: int | None = None
    seed: int | None = None
    timeout_s: float = 60.0
    request_id: str = ""

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s={self.timeout_s}: must be > 0 seconds")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens}: must be >= 1 or None")

    @property
    def group_key(self) -> tuple:
        """Requests batch together only with equal parameters (and equal seeds when sampling)."""
        sampling = getattr(self.params, "temperature", 0.0) > 0
        return (self.params, self.seed if sampling else None)


@dataclass(frozen=True)
class GenerationOutput:
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop": EOS reached; "length": generation slots or max_tokens ran out
    prompt_tokens: int
    nfe: int
    batch_size: int
    queue_s: float
    decode_s: float

    @property
    def tpf(self) -> float:
        return len(self.token_ids) / max(self.nfe, 1)


class EngineMetrics(Protocol):
    def on_batch(self, size: int, seconds: float, tokens: int, nfe: Sequence[int]) -> None: ...

    def on_request(self, status: str, output: GenerationOutput | None) -> None: ...


@dataclass
class _Item:
    req: GenerationRequest
    stream: bool
    queue: asyncio.Queue
    arrived: float
    deadline: float
    cancelled: bool = False
    sent: int = 0  # tokens already streamed (touched by the worker thread only)
    key: tuple = field(default=())


def committed_prefix_lengths(slots: torch.Tensor, mask_id: int, eos_ids: torch.Tensor) -> list[int]:
    """Per row of ``slots`` (B, G): the length of the prefix before the first mask or EOS."""
    stop = (slots == mask_id) | torch.isin(slots, eos_ids)
    first = stop.to(torch.int8).argmax(dim=-1)
    return torch.where(stop.any(dim=-1), first, torch.full_like(first, slots.shape[-1])).tolist()


class BatchingEngine:
    """Request-level dynamic batching for one model on one worker thread."""

    def __init__(self, model: torch.nn.Module, sampler: str = "d3llm", max_batch_size: int = 16,
                 batch_wait_timeout_s: float = 0.01, metrics: EngineMetrics | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}: must be >= 1 (1 turns batching off)")
        if batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s={batch_wait_timeout_s}: must be >= 0")
        self.model = model
        self.spec = get_sampler(sampler)
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.metrics = metrics
        cfg = model.config
        self._mask_id = cfg.mask_id
        self._eos = torch.tensor(cfg.eos_ids)
        self._pending: collections.deque[_Item] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="d3ray-decode")
        self._closed = False
        self.stats = {"requests": 0, "batches": 0, "max_batch": 0, "timeouts": 0, "abandoned": 0,
                      "tokens": 0, "nfe": 0}

    # ------------------------------------------------------------ public API
    def check(self, req: GenerationRequest) -> None:
        """Raise ValueError now if the model cannot decode ``req`` (empty or too long prompt, bad ids)."""
        cfg = self.model.config
        validate_prompts([req.prompt_ids], req.params.gen_length, cfg.max_seq_len, cfg.vocab_size)

    async def generate(self, req: GenerationRequest) -> GenerationOutput:
        async with contextlib.aclosing(self._run(req, stream=False)) as events:
            async for event in events:
                if isinstance(event, GenerationOutput):
                    return event
        raise EngineClosed("the engine stopped before the request finished")

    async def stream(self, req: GenerationRequest) -> AsyncIterator[list[int] | GenerationOutput]:
        """Yields lists of newly committed token ids, then the :class:`GenerationOutput`."""
        async with contextlib.aclosing(self._run(req, stream=True)) as events:
            async for event in events:
                yield event

    @property
    def healthy(self) -> bool:
        return not self._closed and not (self._task is not None and self._task.done())

    @property
    def queued(self) -> int:
        return sum(not it.cancelled for it in self._pending)

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        for it in self._pending:
            it.queue.put_nowait(EngineClosed("the engine was shut down"))
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ request side
    async def _run(self, req: GenerationRequest, stream: bool) -> AsyncIterator[Any]:
        if self._closed:
            raise EngineClosed("the engine was shut down")
        self.check(req)
        self._ensure_started()
        now = time.monotonic()
        item = _Item(req, stream, asyncio.Queue(), now, now + req.timeout_s, key=req.group_key)
        self._pending.append(item)
        self.stats["requests"] += 1
        self._wake.set()
        status = "cancelled"
        try:
            while True:
                remaining = item.deadline - time.monotonic()
                try:
                    event = await asyncio.wait_for(item.queue.get(), max(remaining, 0.0))
                except asyncio.TimeoutError:
                    status = "timeout"
                    self.stats["timeouts"] += 1
                    raise EngineTimeout(f"request {req.request_id or '?'} did not finish within {req.timeout_s} s")
                if isinstance(event, BaseException):
                    status = "error"
                    raise event
                if isinstance(event, GenerationOutput):
                    status = "ok"
                    item.cancelled = True
                    if self.metrics is not None:
                        self.metrics.on_request("ok", event)
                    yield event
                    return
                yield event
        finally:
            item.cancelled = True
            if status != "ok" and self.metrics is not None:
                self.metrics.on_request(status, None)

    def _ensure_started(self) -> None:
        if self._task is None or self._task.done():
            if self._task is not None and self._task.done() and not self._task.cancelled() and self._task.exception():
                logger.error("batch scheduler died (%r); restarting it", self._task.exception())
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._task = self._loop.create_task(self._schedule())

    # ------------------------------------------------------------ scheduler
    def _drop_gone(self) -> None:
        while self._pending and self._pending[0].cancelled:
            self._pending.popleft()

    def _count(self, key: tuple) -> int:
        return sum(1 for it in self._pending if it.key == key and not it.cancelled)

    def _take(self, key: tuple) -> list[_Item]:
        group, rest = [], collections.deque()
        for it in self._pending:
            if it.cancelled:
                continue
            if it.key == key and len(group) < self.max_batch_size:
                group.append(it)
            else:
                rest.append(it)
        self._pending = rest
        return group

    async def _schedule(self) -> None:
        while not self._closed:
            self._drop_gone()
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            head = self._pending[0]
            wait = head.arrived + self.batch_wait_timeout_s - time.monotonic()
            if wait > 0 and self._count(head.key) < self.max_batch_size:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                continue
            group = self._take(head.key)
            if group:
                await self._loop.run_in_executor(self._executor, self._decode, group)

    # ------------------------------------------------------------ worker thread
    def _post(self, item: _Item, event: Any) -> None:
        self._loop.call_soon_threadsafe(item.queue.put_nowait, event)

    def _decode(self, group: list[_Item]) -> None:
        started = time.monotonic()
        params = group[0].req.params
        prompts = [list(it.req.prompt_ids) for it in group]
        generator = None
        if getattr(params, "temperature", 0.0) > 0:
            generator = torch.Generator(device=next(self.model.parameters()).device)
            seed = group[0].req.seed
            generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
        try:
            result = self.spec.generate(self.model, prompts, params, generator=generator, on_step=self._make_hook(group))
        except _Abandoned:
            self.stats["abandoned"] += 1
            logger.info("abandoned a batch of %d: every request timed out or was cancelled", len(group))
            return
        except Exception as e:  # the sampler's errors belong to the requests, not to the scheduler
            logger.warning("batch of %d failed: %r", len(group), e)
            for it in group:
                self._post(it, e)
            return
        seconds = time.monotonic() - started
        tokens = 0
        for it, seq in zip(group, result.sequences):
            ids = seq.response_ids
            finish = "stop" if len(ids) < len(seq.tokens) else "length"
            if it.req.max_tokens is not None and len(ids) > it.req.max_tokens:
                ids, finish = ids[:it.req.max_tokens], "length"
            tokens += len(ids)
            if it.stream and len(ids) > it.sent:
                self._post(it, ids[it.sent:])
                it.sent = len(ids)
            self._post(it, GenerationOutput(tuple(ids), finish, len(it.req.prompt_ids), seq.nfe, len(group),
                                            started - it.arrived, seconds))
        self.stats["batches"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], len(group))
        self.stats["tokens"] += tokens
        self.stats["nfe"] += result.total_nfe
        if self.metrics is not None:
            self.metrics.on_batch(len(group), seconds, tokens, [s.nfe for s in result.sequences])

    def _make_hook(self, group: list[_Item]):
        streaming = any(it.stream for it in group)

        def on_step(snapshot) -> None:
            if all(it.cancelled for it in group):
                raise _Abandoned
            if not streaming:
                return
            slots, lengths = snapshot.tokens, snapshot.committed
            for r, it in enumerate(group):
                if not it.stream or it.cancelled:
                    continue
                n = lengths[r] if it.req.max_tokens is None else min(lengths[r], it.req.max_tokens)
                if n > it.sent:
                    self._post(it, slots[r, it.sent:n].tolist())
                    it.sent = n

        return on_step
