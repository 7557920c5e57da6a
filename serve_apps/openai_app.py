"""OpenAI-compatible Ray Serve application: a FastAPI ingress in front of a continuously batching dLLM.

``serve run serve_apps.openai_app:app_builder preset=tiny`` (or ``serve deploy
serve_apps/config/tiny.yaml``) serves ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``,
``/health`` (liveness), ``/ready`` (readiness; both in :mod:`serve_apps.health`) and ``/metrics``
(Prometheus). The ingress admits or refuses a request before reading its body
(:mod:`serve_apps.admission`), limits the body size, parses and validates requests and tokenizes
them off the event loop, then calls the model deployment (:class:`D3LLMModel`), which owns the
checkpoint and a :class:`~serve_apps.batching.ContinuousEngine` and streams final text back. Every
failure reaches the client as an OpenAI-style error body: 4xx for bad requests (401 without the
API key, 413 for an oversized body, 429 + ``Retry-After`` when a request would wait for a decoder
row beyond the queue budget), 408 for a request past its timeout, 503 when no replica could serve
it. The one exception is a burst beyond the ingress's own bound and the proxy's queue for it
(``ServeConfig.ingress_options``): Serve's proxy refuses that surplus itself, with 429 +
``Retry-After`` and Serve's plain-text body.
"""

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import time
import weakref
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_apps import protocol as P
from serve_apps.admission import Admission
from serve_apps.config import PRESETS, ServeConfig
from serve_apps.health import ModelWatch, liveness, readiness
from serve_apps.metrics import CONTENT_TYPE, HttpMetrics
from serve_apps.openapi import install_openapi
from serve_apps.replica import TRUST_FLAG, D3LLMModel, engine_error
from serve_apps.requests import GenerationOutput, GenerationRequest
from serve_apps.responses import EventStream, new_id, response_body
from serve_apps.text import encode_chat, encode_completion_prompt

logger = logging.getLogger(__name__)

__all__ = ["ServeConfig", "PRESETS", "D3LLMModel", "OpenAIIngress", "build_app", "app_builder"]

_INGRESS: dict[str, Any] = {}  # the ingress instance of this replica process
API_KEY_ENV = "D3RAY_API_KEY"


def _both(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    """Both releases (each idempotent) as one."""

    def release() -> None:
        first()
        second()

    return release


async def _await(response) -> Any:
    return await response


def controller_view() -> tuple[dict[str, int], str]:
    """The model deployment's replica states and status, from Serve's controller (blocking: a worker thread)."""
    dep = serve.status().applications[serve.get_replica_context().app_name].deployments[D3LLMModel.name]
    return {str(k): v for k, v in dep.replica_states.items()}, str(getattr(dep.status, "value", dep.status))


def check_canvas(cfg: ServeConfig, context: int) -> None:
    limit = min(context, cfg.max_model_len or context)
    if cfg.max_gen_length >= limit:
        raise ValueError(f"ServeConfig.max_gen_length={cfg.max_gen_length}: must be below the model's context "
                         f"{limit} so that a prompt fits; lower max_gen_length")


def _schema_limits() -> dict[str, Any]:
    """The running deployment's bounds for the OpenAPI schema (read from the real module, see OpenAIIngress)."""
    import serve_apps.openai_app as module

    ingress = module._INGRESS.get("current")
    if ingress is None:
        return {}
    cfg = ingress.cfg
    kinds = P.field_types(type(cfg.default_params()))
    overridable = {}
    for name, (low, high) in cfg.limits.items():
        kind, nullable = kinds[name]
        spec = {"type": {bool: "boolean", int: "integer", float: "number"}.get(kind, "string")}
        spec.update({k: v for k, v in (("minimum", low), ("maximum", high)) if v is not None})
        overridable[name] = {"anyOf": [spec, {"type": "null"}]} if nullable else spec
    return {"sampler_params": overridable, "model": cfg.model_name, "max_n": cfg.max_batch_size,
            "max_tokens": cfg.max_gen_length,
            "max_temperature": cfg.limits.get("temperature", (None, None))[1],
            "vocab": ingress.model_config.vocab_size}


api = FastAPI(title="d3ray OpenAI-compatible dLLM server", version="0.1.0")
install_openapi(api, _schema_limits)


@api.exception_handler(P.APIError)
async def _api_error(request: Request, exc: P.APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(P.error_body(400, str(exc), "invalid_request_error"), status_code=400)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(P.error_body(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", kind),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s %s", request.method, request.url.path)
    return JSONResponse(P.error_body(500, f"internal error ({type(exc).__name__}); this is a server bug",
                                     "internal_error"), status_code=500)


def _route(scope: dict) -> str:
    route = scope.get("route")  # set by FastAPI's router on the shared scope once a route matched
    return getattr(route, "path", None) or "unmatched"


class _Observe:
    """Pure ASGI middleware around every HTTP request (see :meth:`OpenAIIngress.observe`).

    Not ``@api.middleware("http")``: Starlette's ``BaseHTTPMiddleware`` reads ``receive`` on its own
    to watch for disconnects, and under Serve each read is an actor call back to the proxy. On 2 cores
    that doubled the CPU that both the proxy and the ingress spend on a request (docs/benchmarks.md).
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        ingress = _INGRESS.get("current")
        if scope["type"] != "http" or ingress is None:
            await self.app(scope, receive, send)
            return
        await ingress.observe(scope, receive, send, self.app)


api.add_middleware(_Observe)


@serve.deployment(max_ongoing_requests=1024)
@serve.ingress(api)
class OpenAIIngress:
    """HTTP front: OpenAI protocol, tokenization and SSE; decoding is delegated to ``D3LLMModel``."""

    def __init__(self, model: DeploymentHandle, cfg: ServeConfig) -> None:
        from d3core.models.checkpoint import load_config
        from d3core.models.tokenizer import load_tokenizer

        self.model = model
        self.cfg = cfg
        self.api_key = cfg.api_key or os.environ.get(API_KEY_ENV) or None
        self.tokenizer = load_tokenizer(cfg.tokenizer_uri, cfg.trust_remote_code, flag=TRUST_FLAG)
        self.model_config = load_config(cfg.model)
        check_canvas(cfg, self.model_config.max_seq_len)
        self.context = min(self.model_config.max_seq_len, cfg.max_model_len or self.model_config.max_seq_len)
        self.metrics = HttpMetrics()
        self.inflight = 0
        self.created, self.started = int(time.time()), time.monotonic()
        # The probes' view of the model deployment, refreshed in the background (never on a request's path).
        self.watch = ModelWatch(controller_view, lambda: self.model.stats.remote())
        with contextlib.suppress(RuntimeError):  # Serve builds this class on its event loop; elsewhere, on demand
            self.watch.start()
        # Decoder rows (n per prompt) handed to the model and not finished, bounded by count and by queue budget.
        self.admission = Admission(cfg.row_capacity, cfg.max_batch_size, cfg.queue_budget_s, lambda: self.watch.running)
        # One thread for JSON parsing and tokenization: off the event loop, one tokenizer call at a time.
        self.cpu = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="d3ray-ingress")
        # Serve ships this class by value (its globals are copies); the middleware reads the real module.
        import serve_apps.openai_app as module

        module._INGRESS["current"] = self

    # ------------------------------------------------------------ middleware
    async def observe(self, scope: dict, receive, send, app) -> None:
        """Every request: API key on /v1 routes, in-flight count, status code sent and latency by route."""
        started = time.monotonic()
        self.watch.start()  # no-op while it runs; restarts it if it stopped
        self.inflight += 1
        self.metrics.inflight.inc()
        status = 500  # what the outer error handler sends if the app raises before answering

        async def sending(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.api_key and scope["path"].startswith("/v1") and not self._authorized(Request(scope)):
                response = JSONResponse(P.error_body(401, "missing or incorrect API key: send 'Authorization: "
                                                          "Bearer <key>'", "invalid_request_error",
                                                     code="invalid_api_key"), status_code=401)
                await response(scope, receive, sending)
            else:
                await app(scope, receive, sending)
        finally:
            self.inflight -= 1
            self.metrics.inflight.dec()
            self.metrics.observe(scope["method"], _route(scope), status, time.monotonic() - started)

    def _authorized(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        return header.startswith("Bearer ") and header[len("Bearer "):].strip() == self.api_key

    # ------------------------------------------------------------ routes
    @api.get("/health")
    async def health(self) -> JSONResponse:
        """Liveness: this ingress answers (its own state only; see serve_apps.health)."""
        return liveness(self.cfg.model_name, self.started, {"inflight": self.inflight - 1})

    @api.get("/ready")
    async def ready(self) -> JSONResponse:
        """Readiness: a model replica can take a request now (the background watch's view)."""
        a = self.admission
        return readiness(self.watch, {"inflight": self.inflight - 1, "rows_in_use": a.rows_in_use,
                                      "capacity": a.capacity, "expected_wait_s": round(a.expected_wait_s(), 3),
                                      "queue_budget_s": a.budget_s, "request_s": a.request_s})

    @api.get("/metrics")
    async def metrics(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

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
                "sampler": self.cfg.sampler, "max_model_len": self.context}

    def _check_model(self, name: str, param: str = "model") -> None:
        if name != self.cfg.model_name:
            raise P.APIError(404, f"model {name!r} does not exist: this server serves {self.cfg.model_name!r}",
                             param=param, code="model_not_found")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.cfg.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise P.APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes: send a "
                                  "shorter prompt", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise P.APIError(413, f"request body exceeds the limit of {limit} bytes: send a shorter prompt",
                                 code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def _prepare(self, raw: bytes, model_cls: type, chat: bool) -> tuple[Any, list[GenerationRequest], list]:
        """Parse, validate and tokenize (runs on the ingress worker thread)."""
        req = P.parse_request(raw, model_cls)
        self._check_model(req.model)
        params, max_tokens = P.resolve_params(self.cfg, req)
        if chat:
            prompts, param = [req.messages], "messages"
            ids_list = [encode_chat(self.tokenizer, req.messages)]
        else:
            prompts, param = req.prompts, "prompt"
            ids_list = [encode_completion_prompt(self.tokenizer, p) for p in prompts]
        if len(ids_list) * req.n > self.cfg.max_batch_size:
            raise P.APIError(400, f"{len(ids_list)} prompts x n={req.n} completions exceed this deployment's "
                                  f"max_batch_size {self.cfg.max_batch_size}: split the request", param="n",
                             code="out_of_range")
        gens = []
        for i, ids in enumerate(ids_list):
            where = param if len(ids_list) == 1 else f"{param}.{i}"
            P.check_prompt(ids, params.gen_length, self.context, self.model_config.vocab_size, where)
            seed = None if req.seed is None else req.seed + i * req.n
            gens.append(GenerationRequest(tuple(ids), params, max_tokens, seed, req.n, req.stop_strings,
                                          req.want_logprobs, self.cfg.request_timeout_s, new_id("req")))
        return req, gens, prompts

    async def _serve(self, request: Request, model_cls: type, chat: bool):
        # A row is held from arrival, before the body is read (under Serve each read is a call back to the
        # proxy) and while the request waits for the tokenizer thread: in a burst beyond capacity the rest
        # are refused at once instead of after every one before them has been read and tokenized.
        admit_by = time.time() + self.admission.budget_s  # wall clock: the replica checks it too
        release = self.admission.reserve(1)
        handed_over = False
        try:
            raw = await self._read_body(request)
            loop = asyncio.get_running_loop()
            req, gens, prompts = await loop.run_in_executor(self.cpu, self._prepare, raw, model_cls, chat)
            rows = sum(g.n for g in gens)
            if rows > 1:
                release = _both(release, self.admission.reserve(rows - 1))
            self.admission.check_deadline(admit_by)
            if req.stream:
                response = await self._stream(gens, req, prompts, chat, release, admit_by)
                handed_over = True  # the event stream releases the rows when it ends or is dropped
                return response
            outs = await asyncio.gather(*(self._complete(g, admit_by) for g in gens), return_exceptions=True)
        finally:
            if not handed_over:
                release()
        for out in outs:
            if isinstance(out, BaseException):
                raise out
        return await loop.run_in_executor(self.cpu, response_body, self.tokenizer, outs, req, prompts, chat)

    def _on_output(self, out: GenerationOutput) -> None:
        self.metrics.on_output(out)
        self.admission.observe(out.decode_s, len(out.choices))

    async def _complete(self, gen: GenerationRequest, admit_by: float) -> GenerationOutput:
        response = self.model.generate.remote(gen, admit_by)
        try:  # at most the queue budget at a replica's gate, then the engine's own deadline
            out = await asyncio.wait_for(_await(response), timeout=self.admission.budget_s + gen.timeout_s + 5.0)
        except asyncio.TimeoutError:
            response.cancel()
            raise P.APIError(408, f"request did not finish within {gen.timeout_s} s", type="timeout_error",
                             code="request_timeout") from None
        except (RayError, RayServeException, BackPressureError) as e:
            logger.warning("model call failed: %r", e)
            raise engine_error(e) from e
        if isinstance(out, P.APIError):
            raise out
        self._on_output(out)
        return out

    async def _stream(self, gens: list[GenerationRequest], req: Any, prompts: list, chat: bool,
                      release: Callable[[], None], admit_by: float) -> StreamingResponse:
        streams = [self.model.options(stream=True).generate_stream.remote(g, admit_by) for g in gens]
        try:
            for s, g in zip(streams, gens):
                first = await asyncio.wait_for(s.__anext__(), timeout=self.admission.budget_s + g.timeout_s)
                if isinstance(first, P.APIError):
                    raise first
        except asyncio.TimeoutError:
            raise P.APIError(408, "request was not accepted within its timeout", type="timeout_error",
                             code="request_timeout") from None
        except StopAsyncIteration:
            raise P.APIError(503, "the model closed the stream", type="service_unavailable_error") from None
        except (RayError, RayServeException, BackPressureError) as e:
            raise engine_error(e) from e
        except BaseException:
            for s in streams:
                s.cancel()
            raise
        deadline = time.monotonic() + max(g.timeout_s for g in gens) + 5.0
        events = EventStream(self.tokenizer, self._on_output, streams, deadline, req, prompts, chat, release).events()
        weakref.finalize(events, release)  # a client gone before the stream starts: release when dropped
        return StreamingResponse(events, media_type="text/event-stream")


def build_app(cfg: ServeConfig) -> serve.Application:
    """The application for ``cfg``: ingress (CPU) -> model deployment (replicas/autoscaling)."""
    model = D3LLMModel.options(**cfg.deployment_options()).bind(cfg)
    ingress = OpenAIIngress.options(**cfg.ingress_options())
    return ingress.bind(model, cfg)


def app_builder(args: dict) -> serve.Application:
    """Ray Serve application builder: ``serve run serve_apps.openai_app:app_builder preset=tiny ...``."""
    from d3core.models.checkpoint import load_config
    from d3core.models.hub import resolve_checkpoint
    from d3core.models.tokenizer import check_remote_code

    cfg = ServeConfig.from_args(args)
    # Fail at `serve run` / `serve deploy`, not in a replica restart loop: the tokenizer must be loadable
    # and the canvas must leave room for a prompt in the model's context.
    check_remote_code(resolve_checkpoint(cfg.tokenizer_uri, weights=False, trust_remote_code=cfg.trust_remote_code),
                      cfg.trust_remote_code, flag=TRUST_FLAG)
    try:
        check_canvas(cfg, load_config(cfg.model).max_seq_len)
    except FileNotFoundError:  # not reachable from here (e.g. a cluster path): each ingress replica checks
        logger.info("checkpoint %s not reachable at build time; the canvas is checked when replicas start", cfg.model)
    logger.info("building the OpenAI app for %s", cfg)
    return build_app(cfg)
