"""The model deployment of the OpenAI app: one replica owns a checkpoint and a continuously batching engine.

:class:`D3LLMModel` loads the checkpoint and its tokenizer (final text and stop strings are decided
next to the decoder), runs a :class:`~serve_apps.batching.ContinuousEngine`, and answers the ingress's
calls with outputs or stream events. Engine failures become :class:`~serve_apps.protocol.APIError` s
here (``engine_error``), so that what crosses the actor boundary is always an OpenAI-style error.

A call first passes the replica's :class:`~serve_apps.admission.RowGate`: it reaches the engine
only when a decoder row is free for it, and a call whose queue budget runs out while it waits
there gets a 429 at that moment (``serve_apps.admission`` describes the budget).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, AsyncIterator

import torch
from ray import serve
from ray.serve.exceptions import BackPressureError

from serve_apps import protocol as P
from serve_apps.admission import GateClosed, RowGate, overloaded
from serve_apps.batching import ContinuousEngine
from serve_apps.config import ServeConfig
from serve_apps.metrics import engine_metrics
from serve_apps.requests import (
    EngineClosed,
    EngineOverloaded,
    EngineTimeout,
    GenerationOutput,
    GenerationRequest,
    RequestFailed,
)

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRUST_FLAG = "trust_remote_code: true in the serve config args (serve run: trust_remote_code=true)"


def engine_error(e: BaseException) -> P.APIError:
    if isinstance(e, P.APIError):
        return e
    if isinstance(e, EngineTimeout):
        return P.APIError(408, str(e), type="timeout_error", code="request_timeout")
    if isinstance(e, EngineOverloaded):
        return P.APIError(429, str(e), type="rate_limit_error", code="overloaded", retry_after_s=e.retry_after_s)
    if isinstance(e, BackPressureError):
        return P.APIError(429, f"server overloaded ({e}): retry shortly", type="rate_limit_error", code="overloaded",
                          retry_after_s=1.0)
    if isinstance(e, ValueError):
        return P.APIError(400, str(e), code="invalid_value")
    if isinstance(e, RequestFailed):
        return P.APIError(503, f"this request failed in the decoder ({e}); other requests are unaffected",
                          type="service_unavailable_error", code="decode_failed")
    return P.APIError(503, f"the model could not serve this request ({type(e).__name__}): retry",
                      type="service_unavailable_error", code="unavailable")



@serve.deployment
class D3LLMModel:
    """One model replica: the checkpoint, its tokenizer (for final text and stop strings) and the engine."""

    def __init__(self, cfg: ServeConfig) -> None:
        from d3core.models.checkpoint import load_pretrained
        from d3core.models.tokenizer import load_tokenizer

        if cfg.torch_threads is not None:
            torch.set_num_threads(cfg.torch_threads)
        self.cfg = cfg
        model = load_pretrained(cfg.model, device=cfg.device)
        self.model = model.to(dtype=DTYPES[cfg.dtype]).eval()
        tokenizer = load_tokenizer(cfg.tokenizer_uri, cfg.trust_remote_code, flag=TRUST_FLAG)
        # The gate keeps the engine's own queue to a step boundary's worth: its bound is never reached.
        self.engine = ContinuousEngine(self.model, tokenizer, cfg.sampler, cfg.max_batch_size,
                                       max_queued=cfg.max_batch_size, batching=cfg.batching,
                                       batch_wait_timeout_s=cfg.batch_wait_timeout_s,
                                       metrics=engine_metrics(cfg.model_name), capacity=cfg.max_model_len)
        self.gate = RowGate(cfg.max_batch_size, cfg.max_queued_requests)
        logger.info("loaded %s (%s, %s) with sampler %s, %s batching", cfg.model, cfg.device, cfg.dtype,
                    cfg.sampler, cfg.batching)

    async def _enter(self, req: GenerationRequest, admit_by: float | None) -> P.APIError | None:
        """Wait at the gate for ``req.n`` rows until ``admit_by`` (wall clock); a 429 if the budget runs out."""
        try:
            self.engine.check(req)  # a request the engine can never take is a 400 now, not after a wait
            await self.gate.enter(req.n, admit_by if admit_by is not None else time.time() + self.cfg.queue_budget_s)
        except ValueError as e:
            return engine_error(e)
        except GateClosed as e:
            return overloaded(f"{e} (queue budget {self.cfg.queue_budget_s:g} s)", self.engine.retry_after_s())
        return None

    async def generate(self, req: GenerationRequest, admit_by: float | None = None) -> GenerationOutput | P.APIError:
        refused = await self._enter(req, admit_by)
        if refused is not None:
            return refused
        try:
            return await self.engine.generate(req)
        except (ValueError, EngineTimeout, EngineClosed, EngineOverloaded, RequestFailed) as e:
            return engine_error(e)
        finally:
            self.gate.leave(req.n)

    async def generate_stream(self, req: GenerationRequest, admit_by: float | None = None) -> AsyncIterator[Any]:
        """First ``"accepted"`` (or an APIError), then :class:`Delta` s, then the output (or an APIError)."""
        refused = await self._enter(req, admit_by)
        if refused is not None:
            yield refused
            return
        try:  # closing this stream (the caller went away) closes the engine's at once, then gives the rows back
            async with contextlib.aclosing(self._stream(req)) as events:
                async for event in events:
                    yield event
        finally:
            self.gate.leave(req.n)

    async def _stream(self, req: GenerationRequest) -> AsyncIterator[Any]:
        try:
            stream = self.engine.stream(req)
            first = await stream.__anext__()
        except StopAsyncIteration:
            yield P.APIError(503, "the engine ended the stream", type="service_unavailable_error")
            return
        except (ValueError, EngineTimeout, EngineClosed, EngineOverloaded, RequestFailed) as e:
            yield engine_error(e)
            return
        yield "accepted"
        yield first
        try:
            async for event in stream:
                yield event
        except (ValueError, EngineTimeout, EngineClosed, EngineOverloaded, RequestFailed) as e:
            yield engine_error(e)
        finally:
            await stream.aclose()

    def stats(self) -> dict:
        """The engine's counters and this replica's rows: also the readiness probe's call (serve_apps.health)."""
        return dict(self.engine.stats, queued=self.engine.queued, running=self.engine.running,
                    gate_waiting=self.gate.waiting, gate_free=self.gate.free)

    def check_health(self) -> None:
        """Liveness for Serve's controller: the decode thread runs and makes progress."""
        if not self.engine.alive:
            raise RuntimeError("the decode scheduler is not running or has stalled")
