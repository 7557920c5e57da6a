"""OpenAI-compatible Ray Serve application: a FastAPI ingress in front of a batching dLLM deployment.

``serve run serve_apps.openai_app:app_builder preset=tiny`` (or ``serve deploy
serve_apps/config/tiny.yaml``) serves ``/v1/completions``, ``/v1/chat/completions``,
``/v1/models`` and ``/health``. The ingress parses and validates requests, applies the chat
template, checks prompt length and sampler limits, and turns token ids into text (streamed as
SSE); the model deployment (``D3LLMModel``, ``num_gpus`` on GPU presets, CPU on ``tiny``) owns
the checkpoint and a :class:`~serve_apps.engine.BatchingEngine`, and scales by replicas or
autoscaling. Every failure reaches the client as an OpenAI-style error body: 4xx for bad
requests, 408 for a request past its timeout, 503 when no replica could serve it.
"""


import asyncio
import logging
import time
from typing import Any, AsyncIterator

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_apps import protocol as P
from serve_apps.config import PRESETS, ServeConfig
from serve_apps.engine import BatchingEngine, EngineClosed, EngineTimeout, GenerationOutput, GenerationRequest
from serve_apps.metrics import engine_metrics, http_metrics
from serve_apps.text import TextStream, encode_chat, encode_completion_prompt

logger = logging.getLogger(__name__)

__all__ = ["ServeConfig", "PRESETS", "D3LLMModel", "OpenAIIngress", "build_app", "app_builder"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRUST_FLAG = "trust_remote_code: true in the serve config args (serve run: trust_remote_code=true)"


async def _await(response) -> Any:
    return await response


def _engine_error(e: BaseException) -> P.APIError:
    if isinstance(e, P.APIError):
        return e
    if isinstance(e, EngineTimeout):
        return P.APIError(408, str(e), type="timeout_error", code="request_timeout")
    if isinstance(e, ValueError):
        return P.APIError(400, str(e), code="invalid_value")
    return P.APIError(503, f"the model could not serve this request ({type(e).__name__}): retry",
                      type="service_unavailable_error", code="unavailable")


@serve.deployment
class D3LLMModel:
    """One model replica: loads the checkpoint and decodes batches of concurrent requests."""

    def __init__(self, cfg: ServeConfig) -> None:
        from d3core.models.checkpoint import load_pretrained

        if cfg.torch_threads is not None:
            torch.set_num_threads(cfg.torch_threads)
        self.cfg = cfg
        model = load_pretrained(cfg.model, device=cfg.device)
        self.model = model.to(dtype=DTYPES[cfg.dtype]).eval()
        self.engine = BatchingEngine(self.model, cfg.sampler, cfg.max_batch_size, cfg.batch_wait_timeout_s,
                                     metrics=engine_metrics(cfg.model_name))
        logger.info("loaded %s (%s, %s) with sampler %s", cfg.model, cfg.device, cfg.dtype, cfg.sampler)

    async def generate(self, req: GenerationRequest) -> GenerationOutput | P.APIError:
        try:
            return await self.engine.generate(req)
        except (ValueError, EngineTimeout, EngineClosed) as e:
            return _engine_error(e)

    async def generate_stream(self, req: GenerationRequest) -> AsyncIterator[Any]:
        """First ``"accepted"`` (or an APIError), then lists of new token ids, then the output."""
        try:
            self.engine.check(req)
        except ValueError as e:
            yield _engine_error(e)
            return
        yield "accepted"
        try:
            async for event in self.engine.stream(req):
                yield event
        except (ValueError, EngineTimeout, EngineClosed) as e:
            yield _engine_error(e)

    def stats(self) -> dict:
        return dict(self.engine.stats, queued=self.engine.queued)

    def check_health(self) -> None:
        if not self.engine.healthy:
            raise RuntimeError("the batch scheduler is not running")


api = FastAPI(title="d3ray OpenAI-compatible dLLM server")


@api.exception_handler(P.APIError)
async def _api_error(request: Request, exc: P.APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(P.error_body(400, str(exc), "invalid_request_error"), status_code=400)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(P.error_body(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", kind),
                        status_code=exc.status_code)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s %s", request.method, request.url.path)
    return JSONResponse(P.error_body(500, f"internal error ({type(exc).__name__}); this is a server bug",
                                     "internal_error"), status_code=500)


@serve.deployment(max_ongoing_requests=1024)
@serve.ingress(api)
class OpenAIIngress:
    """HTTP front: OpenAI protocol, tokenization and SSE; decoding is delegated to ``D3LLMModel``."""

    def __init__(self, model: DeploymentHandle, cfg: ServeConfig) -> None:
        from d3core.models.checkpoint import load_config
        from d3core.models.tokenizer import load_tokenizer

        self.model = model
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.tokenizer_uri, cfg.trust_remote_code, flag=TRUST_FLAG)
        self.model_config = load_config(cfg.model)
        self.metrics = http_metrics()
        self.created = int(time.time())

    # ------------------------------------------------------------ routes
    @api.get("/health")
    async def health(self) -> JSONResponse:
        try:
            stats = await asyncio.wait_for(self.model.stats.remote(), timeout=10.0)
        except (RayError, RayServeException, asyncio.TimeoutError) as e:
            return JSONResponse(P.error_body(503, f"model deployment unavailable ({type(e).__name__})",
                                             "service_unavailable_error"), status_code=503)
        return JSONResponse({"status": "ok", "model": self.cfg.model_name, "replica_stats": stats})

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    @api.get("/v1/models/{model_id}")
    async def model(self, model_id: str) -> dict:
        self._check_model(model_id, "model_id")
        return self._model_card()

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, P.CompletionRequest, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve(request, P.ChatCompletionRequest, chat=True)

    # ------------------------------------------------------------ helpers
    def _model_card(self) -> dict:
        return {"id": self.cfg.model_name, "object": "model", "created": self.created, "owned_by": "d3ray",
                "sampler": self.cfg.sampler, "max_model_len": self.model_config.max_seq_len}

    def _check_model(self, name: str, param: str = "model") -> None:
        if name != self.cfg.model_name:
            raise P.APIError(404, f"model {name!r} does not exist: this server serves {self.cfg.model_name!r}",
                             param=param, code="model_not_found")

    def _prepare(self, req: Any, chat: bool) -> GenerationRequest:
        self._check_model(req.model)
        params, max_tokens = P.resolve_params(self.cfg, req)
        if chat:
            ids, param = encode_chat(self.tokenizer, req.messages), "messages"
        else:
            ids, param = encode_completion_prompt(self.tokenizer, req.prompt), "prompt"
        mc = self.model_config
        P.check_prompt(ids, params.gen_length, mc.max_seq_len, mc.vocab_size, param)
        return GenerationRequest(tuple(ids), params, max_tokens, req.seed, self.cfg.request_timeout_s,
                                 P.new_id("req"))

    async def _serve(self, request: Request, model_cls: type, chat: bool):
        started = time.monotonic()
        route = request.url.path
        status = 200
        try:
            req = P.parse_request(await request.body(), model_cls)
            gen = self._prepare(req, chat)
            if req.stream:
                return await self._stream(gen, req, chat)
            return await self._complete(gen, req, chat)
        except P.APIError as e:
            status = e.status
            raise
        finally:
            if self.metrics is not None:
                self.metrics.observe(route, status, time.monotonic() - started)

    async def _complete(self, gen: GenerationRequest, req: Any, chat: bool) -> dict:
        response = self.model.generate.remote(gen)
        try:
            out = await asyncio.wait_for(_await(response), timeout=gen.timeout_s + 5.0)
        except asyncio.TimeoutError:
            response.cancel()
            raise P.APIError(408, f"request did not finish within {gen.timeout_s} s", type="timeout_error",
                             code="request_timeout") from None
        except BackPressureError as e:
            raise P.APIError(503, f"server overloaded: {e}", type="service_unavailable_error",
                             code="overloaded") from e
        except (RayError, RayServeException) as e:
            logger.warning("model call failed: %r", e)
            raise _engine_error(e) from e
        if isinstance(out, P.APIError):
            raise out
        text = self.tokenizer.decode(list(out.token_ids), skip_special_tokens=True)
        use = P.usage(out.prompt_tokens, len(out.token_ids), out.nfe, out.batch_size)
        if chat:
            return P.chat_body(P.new_id("chatcmpl"), req.model, text, out.finish_reason, use)
        return P.completion_body(P.new_id("cmpl"), req.model, text, out.finish_reason, use)

    async def _stream(self, gen: GenerationRequest, req: Any, chat: bool) -> StreamingResponse:
        events = self.model.options(stream=True).generate_stream.remote(gen)
        deadline = time.monotonic() + gen.timeout_s + 5.0
        try:
            first = await asyncio.wait_for(events.__anext__(), timeout=gen.timeout_s)
        except asyncio.TimeoutError:
            events.cancel()
            raise P.APIError(408, f"request was not accepted within {gen.timeout_s} s", type="timeout_error",
                             code="request_timeout") from None
        except StopAsyncIteration:
            raise P.APIError(503, "the model closed the stream", type="service_unavailable_error") from None
        except BackPressureError as e:
            raise P.APIError(503, f"server overloaded: {e}", type="service_unavailable_error",
                             code="overloaded") from e
        except (RayError, RayServeException) as e:
            events.cancel()
            raise _engine_error(e) from e
        if isinstance(first, P.APIError):
            events.cancel()
            raise first
        return StreamingResponse(self._sse(events, deadline, req, chat), media_type="text/event-stream")

    async def _sse(self, events, deadline: float, req: Any, chat: bool) -> AsyncIterator[str]:
        rid = P.new_id("chatcmpl" if chat else "cmpl")
        stream = TextStream(self.tokenizer)

        def chunk(text: str, finish: str | None = None, use: dict | None = None) -> str:
            if chat:
                return P.sse(P.chat_chunk(rid, req.model, {"content": text} if text or finish is None else {},
                                          finish, use))
            return P.sse(P.completion_body(rid, req.model, text, finish, use, chunk=True))

        finished = False
        try:
            if chat:
                yield P.sse(P.chat_chunk(rid, req.model, {"role": "assistant", "content": ""}, None))
            while True:
                try:
                    event = await asyncio.wait_for(events.__anext__(), timeout=max(deadline - time.monotonic(), 0.0))
                except StopAsyncIteration:
                    raise P.APIError(503, "the model closed the stream early: retry",
                                     type="service_unavailable_error", code="unavailable") from None
                except asyncio.TimeoutError:
                    raise P.APIError(408, "request did not finish within its timeout", type="timeout_error",
                                     code="request_timeout") from None
                except (RayError, RayServeException) as e:
                    logger.warning("model stream failed: %r", e)
                    raise _engine_error(e) from e
                if isinstance(event, P.APIError):
                    raise event
                if isinstance(event, GenerationOutput):
                    tail = stream.finish(event.token_ids)
                    use = P.usage(event.prompt_tokens, len(event.token_ids), event.nfe, event.batch_size)
                    yield chunk(tail, event.finish_reason, use)
                    yield P.sse("[DONE]")
                    finished = True
                    return
                delta = stream.push(event)
                if delta:
                    yield chunk(delta)
        except P.APIError as e:
            yield P.sse(e.body())
            yield P.sse("[DONE]")
        finally:
            if not finished:
                events.cancel()


def build_app(cfg: ServeConfig) -> serve.Application:
    """The application for ``cfg``: ingress (CPU) -> model deployment (replicas/autoscaling)."""
    model = D3LLMModel.options(**cfg.deployment_options()).bind(cfg)
    ingress = OpenAIIngress.options(ray_actor_options={"num_cpus": cfg.ingress_num_cpus})
    return ingress.bind(model, cfg)


def app_builder(args: dict) -> serve.Application:
    """Ray Serve application builder: ``serve run serve_apps.openai_app:app_builder preset=tiny ...``."""
    from d3core.models.hub import resolve_checkpoint
    from d3core.models.tokenizer import check_remote_code

    cfg = ServeConfig.from_args(args)
    # Fail at `serve run` / `serve deploy`, not in a replica restart loop: the tokenizer must be loadable.
    check_remote_code(resolve_checkpoint(cfg.tokenizer_uri, weights=False, trust_remote_code=cfg.trust_remote_code),
                      cfg.trust_remote_code, flag=TRUST_FLAG)
    logger.info("building the OpenAI app for %s", cfg)
    return build_app(cfg)

