"""The model deployment of the OpenAI app: one replica owns a checkpoint and a continuously batching engine.

:class:`D3LLMModel` loads the checkpoint and its tokenizer (final text and stop strings are decided
next to the decoder), runs a :class:`~serve_apps.engine.ContinuousEngine`, and answers the ingress's
calls with outputs or stream events. Engine failures become :class:`~serve_apps.protocol.APIError` s
here (``engine_error``), so that what crosses the actor boundary is always an OpenAI-style error.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator

import torch
from ray import serve
from ray.serve.exceptions import BackPressureError

from serve_apps import protocol as P
from serve_apps.config import ServeConfig
from serve_apps.engine import (ContinuousEngine, EngineClosed, EngineOverloaded, EngineTimeout, GenerationOutput,
                               GenerationRequest, RequestFailed)
from serve_apps.metrics import engine_metrics

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
        self.engine = ContinuousEngine(self.model, tokenizer, cfg.sampler, cfg.max_batch_size,
                                       max_queued=cfg.max_queued_requests, batching=cfg.batching,
                                       batch_wait_timeout_s=cfg.batch_wait_timeout_s,
                                       metrics=engine_metrics(cfg.model_name), capacity=cfg.max_model_len)
        logger.info("loaded %s (%s, %s) with sampler %s, %s batching", cfg.model, cfg.device, cfg.dtype,
                    cfg.sampler, cfg.batching)

    async def generate(self, req: GenerationRequest) -> GenerationOutput | P.APIError:
        try:
            return await self.engine.generate(req)
        except (ValueError, EngineTimeout, EngineClosed, EngineOverloaded, RequestFailed) as e:
            return engine_error(e)

    async def generate_stream(self, req: GenerationRequest) -> AsyncIterator[Any]:
        """First ``"accepted"`` (or an APIError), then :class:`Delta` s, then the output (or an APIError)."""
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
        return dict(self.engine.stats, queued=self.engine.queued, running=self.engine.running)

    def check_health(self) -> None:
        """Liveness for Serve's controller: the decode thread runs and makes progress."""
        if not self.engine.alive:
            raise RuntimeError("the decode scheduler is not running or has stalled")
