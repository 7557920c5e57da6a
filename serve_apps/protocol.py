"""OpenAI wire format: request models, validation into sampler parameters, responses, error bodies.

Requests are parsed strictly (unknown fields, wrong types and out-of-range values are rejected)
and every rejection becomes an :class:`APIError` that renders as OpenAI's error body
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status. d3ray extensions:

* ``sampler_params`` (object, via the OpenAI client's ``extra_body``): per-request overrides of
  the deployment's sampler parameters, limited to the names and ranges the deployment allows;
* ``usage`` carries ``nfe`` (model forwards), ``tpf`` (tokens per forward) and ``batch_size``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import types
import typing
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_apps.config import ServeConfig

logger = logging.getLogger(__name__)


class APIError(Exception):
    """A request the server refuses; rendered as an OpenAI-style error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __reduce__(self):  # keeps every field across Ray's pickling
        return (APIError, (self.status, self.message, self.type, self.param, self.code))


def error_body(status: int, message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return APIError(status, message, type, param, code).body()


# ---------------------------------------------------------------- request models

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Common(_Strict):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: Union[bool, int, None] = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    sampler_params: dict[str, Any] | None = None

    def check_unsupported(self) -> None:
        if self.n not in (None, 1):
            raise APIError(400, f"n={self.n} is not supported: send one request per completion (n=1)", param="n",
                           code="unsupported_value")
        if self.top_p not in (None, 1.0):
            raise APIError(400, f"top_p={self.top_p} is not supported by diffusion samplers: omit it or use 1",
                           param="top_p", code="unsupported_value")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0.0):
                raise APIError(400, f"{name}={getattr(self, name)} is not supported: omit it or use 0", param=name,
                               code="unsupported_value")
        for name in ("stop", "logprobs", "logit_bias", "echo", "suffix"):
            value = getattr(self, name, None)
            if value not in (None, False, [], {}):
                raise APIError(400, f"{name}={value!r} is not supported by this server: omit it", param=name,
                               code="unsupported_parameter")


class CompletionRequest(_Common):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=1)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


def parse_request(raw: bytes, model_cls: type[_Common]) -> _Common:
    """Malformed JSON, a non-object body and schema violations all become 400s naming the field."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON ({e}): send a JSON object", code="invalid_json") from e
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        req = model_cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            message = f"unrecognized request argument {param!r}: remove it (d3ray extras go in sampler_params)"
        elif err["type"] == "missing":
            message = f"missing required argument {param!r}"
        else:
            message = f"invalid value for {param!r}: {err['msg']} (got {err.get('input')!r})"
        raise APIError(400, message, param=param, code=err["type"]) from e
    req.check_unsupported()
    return req


# ---------------------------------------------------------------- sampler parameters

def _field_types(params_cls: type) -> dict[str, tuple[type, bool]]:
    """Per dataclass field: (base type, whether None is allowed)."""
    hints = typing.get_type_hints(params_cls)
    out = {}
    for f in dataclasses.fields(params_cls):
        hint = hints[f.name]
        args = typing.get_args(hint)
        if typing.get_origin(hint) in (Union, types.UnionType):
            base = [a for a in args if a is not type(None)]
            out[f.name] = (base[0], type(None) in args)
        else:
            out[f.name] = (hint, False)
    return out


def _check_value(name: str, value: Any, kind: type, nullable: bool) -> None:
    if value is None:
        if not nullable:
            raise APIError(400, f"sampler_params.{name}=null is not allowed: give a {kind.__name__}",
                           param=f"sampler_params.{name}", code="invalid_type")
        return
    ok = isinstance(value, bool) if kind is bool else (
        isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
        isinstance(value, int) and not isinstance(value, bool) if kind is int else isinstance(value, kind))
    if not ok or (kind is float and not math.isfinite(value)):
        raise APIError(400, f"sampler_params.{name}={value!r} has the wrong type: expected a {kind.__name__}",
                       param=f"sampler_params.{name}", code="invalid_type")


def _check_limit(cfg: ServeConfig, name: str, value: Any, param: str) -> None:
    if name not in cfg.limits:
        allowed = sorted(cfg.limits)
        raise APIError(400, f"{param} may not be overridden on this deployment: overridable are {allowed}",
                       param=param, code="unsupported_parameter")
    low, high = cfg.limits[name]
    if value is not None and ((low is not None and value < low) or (high is not None and value > high)):
        raise APIError(400, f"{param}={value} is out of range: allowed [{low}, {high}]", param=param,
                       code="out_of_range")


def resolve_params(cfg: ServeConfig, req: _Common) -> tuple[Any, int | None]:
    """The sampler parameters for ``req`` and the response cap (``max_tokens``) to apply, or a 400."""
    params_cls = type(cfg.default_params())
    types_ = _field_types(params_cls)
    merged = dict(dataclasses.asdict(cfg.default_params()))
    for name, value in (req.sampler_params or {}).items():
        if name not in types_:
            raise APIError(400, f"sampler_params.{name} is not a {cfg.sampler} parameter: known are {sorted(types_)}",
                           param=f"sampler_params.{name}", code="unknown_parameter")
        kind, nullable = types_[name]
        _check_value(name, value, kind, nullable)
        _check_limit(cfg, name, value, f"sampler_params.{name}")
        merged[name] = value
    if req.temperature is not None:
        _check_limit(cfg, "temperature", req.temperature, "temperature")
        merged["temperature"] = float(req.temperature)
    max_tokens = req.max_tokens
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        max_tokens = req.max_completion_tokens
    if max_tokens is not None:
        if max_tokens > cfg.max_gen_length:
            raise APIError(400, f"max_tokens={max_tokens} exceeds this deployment's limit {cfg.max_gen_length}",
                           param="max_tokens", code="out_of_range")
        block = merged["block_length"]
        if max_tokens > merged["gen_length"]:
            merged["gen_length"] = math.ceil(max_tokens / block) * block
    if merged["gen_length"] > cfg.max_gen_length:
        raise APIError(400, f"gen_length={merged['gen_length']} exceeds this deployment's limit {cfg.max_gen_length}",
                       param="max_tokens", code="out_of_range")
    try:
        params = params_cls(**merged)
    except ValueError as e:
        raise APIError(400, f"invalid sampler parameters: {e}", param="sampler_params", code="invalid_value") from e
    return params, max_tokens


def check_prompt(prompt_ids: list[int], gen_length: int, max_seq_len: int, vocab_size: int, param: str) -> None:
    if not prompt_ids:
        raise APIError(400, f"{param} is empty: send at least one token of text", param=param, code="empty_prompt")
    if len(prompt_ids) + gen_length > max_seq_len:
        raise APIError(400, f"{param} has {len(prompt_ids)} tokens; with {gen_length} generation slots that exceeds "
                            f"the model's context of {max_seq_len} tokens: shorten the prompt or max_tokens",
                       param=param, code="context_length_exceeded")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise APIError(400, f"{param} has token ids {bad[:4]} outside the vocabulary [0, {vocab_size})", param=param,
                       code="invalid_token")


# ---------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, nfe: int, batch_size: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "nfe": nfe,
            "tpf": round(completion_tokens / max(nfe, 1), 4), "batch_size": batch_size}


def completion_body(rid: str, model: str, text: str, finish: str | None, use: dict | None, chunk: bool = False) -> dict:
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
    if use is not None or not chunk:
        body["usage"] = use
    return body


def chat_body(rid: str, model: str, text: str, finish: str, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": use}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None, use: dict | None = None) -> dict:
    body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if use is not None:
        body["usage"] = use
    return body


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
