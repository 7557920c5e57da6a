"""OpenAI wire format: request models, validation into engine requests, error bodies.

Field policy, as vLLM's OpenAI server has it (docs/serving.md lists every field):

* known and supported fields are type-checked strictly (a wrong type or range is a 400 naming it);
* known but unsupported values (``top_p < 1``, penalties, ``best_of > 1``, top log-probabilities,
  JSON response formats, tools, ``echo`` with ``logprobs``) are a 400 that says so;
* unknown fields are accepted, ignored and logged.

Every rejection is an :class:`APIError` rendered as OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``. d3ray extensions: ``sampler_params`` (per-request
sampler overrides within the deployment's limits, via the OpenAI client's ``extra_body``) and
``usage.nfe`` / ``usage.tpf`` / ``usage.batch_size``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from d3core.samplers.base import PromptError, validate_prompts
from serve_apps.config import ServeConfig

logger = logging.getLogger(__name__)

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # any signed or unsigned 64-bit seed
MAX_STOP_STRINGS = 16
# pydantic's bound errors, written with the exact bound (its own message renders ints beyond 2**53 as floats)
BOUNDS = {"less_than_equal": "<=", "less_than": "<", "greater_than_equal": ">=", "greater_than": ">"}


def _integral(value: Any) -> Any:
    """JSON Schema counts 5.0 as an integer: accept integral floats for int fields (never strings)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**64:
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_integral)]
Text = Annotated[str, Field(min_length=1)]


def _only(*values: Any) -> dict:
    """Schema note for a field whose other values are refused as unsupported (the check gives the 400)."""
    return {"json_schema_extra": {"enum": [*values, None]}}


class APIError(Exception):
    """A request the server refuses; rendered as an OpenAI-style error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))} if self.retry_after_s else {}

    def __reduce__(self):  # keeps every field across Ray's pickling
        return (APIError, (self.status, self.message, self.type, self.param, self.code, self.retry_after_s))


def error_body(status: int, message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return APIError(status, message, type, param, code).body()


def unsupported(name: str, value: Any, what: str) -> APIError:
    return APIError(400, f"{name}={value!r} is not supported: {what}", param=name, code="unsupported_value")


# ---------------------------------------------------------------- request models

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool | None = None


class _Request(BaseModel):
    """Known fields are strict; unknown ones are kept in ``model_extra``, logged and ignored."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1)
    max_tokens: Int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, **_only(1.0))
    n: Int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = Field(default=None, json_schema_extra={"maxItems": MAX_STOP_STRINGS})
    seed: Int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float | None = Field(default=None, **_only(0.0))
    frequency_penalty: float | None = Field(default=None, **_only(0.0))
    logit_bias: dict[str, float] | None = Field(default=None, json_schema_extra={"maxProperties": 0})
    user: str | None = None
    sampler_params: dict[str, Any] | None = None

    def check_unsupported(self) -> None:
        if self.top_p not in (None, 1.0):
            raise unsupported("top_p", self.top_p, "diffusion samplers take no nucleus cut-off; omit it or use 1")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0.0):
                raise unsupported(name, getattr(self, name), "a parallel decoder has no running history to "
                                                             "penalize; omit it or use 0")
        if self.logit_bias:
            raise unsupported("logit_bias", self.logit_bias, "omit it")
        if self.stop_strings and len(self.stop_strings) > MAX_STOP_STRINGS:
            raise APIError(400, f"stop has {len(self.stop_strings)} strings: at most {MAX_STOP_STRINGS}",
                           param="stop", code="out_of_range")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Request):
    prompt: Union[Text, Annotated[list[Text], Field(min_length=1)], Annotated[list[Int], Field(min_length=1)],
                  Annotated[list[Annotated[list[Int], Field(min_length=1)]], Field(min_length=1)]]
    echo: bool = False
    logprobs: Int | None = Field(default=None, ge=0, le=5, **_only(0))
    suffix: str | None = Field(default=None, **_only(""))
    best_of: Int | None = Field(default=None, ge=1, **_only(1))

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.best_of not in (None, 1) and self.best_of != self.n:
            raise unsupported("best_of", self.best_of, "d3ray returns every one of the n completions; omit it")
        if self.suffix:
            raise unsupported("suffix", self.suffix, "insertion is not supported; omit it")
        if self.logprobs:
            raise unsupported("logprobs", self.logprobs, "a dLLM reports the log-probability of each committed "
                                                         "token only: use logprobs=0")
        if self.echo and self.logprobs is not None:
            raise unsupported("echo", self.echo, "echo with logprobs needs prompt log-probabilities, which a "
                                                 "dLLM does not compute")

    @property
    def prompts(self) -> list[Union[str, list[int]]]:
        """The request's prompts: text or token ids, one or several."""
        p = self.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], int)):
            return [p]
        return list(p)

    @property
    def want_logprobs(self) -> bool:
        return self.logprobs is not None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str = Field(json_schema_extra={"enum": ["text"]})
    text: str

    def check(self, where: str) -> str:
        if self.type != "text":
            raise unsupported(f"{where}.type", self.type, "only text content parts are understood by this model")
        return self.text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def text(self, where: str) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.check(f"{where}.content.{i}") for i, part in enumerate(self.content))


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: Int | None = Field(default=None, ge=0, le=20, **_only(0))
    response_format: dict[str, Any] | None = Field(default=None, json_schema_extra={
        "properties": {"type": {"enum": ["text"]}}})
    tools: list[Any] | None = Field(default=None, json_schema_extra={"maxItems": 0})
    tool_choice: Any = Field(default=None, json_schema_extra={"enum": ["none", "auto", None]})

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.top_logprobs:
            raise unsupported("top_logprobs", self.top_logprobs, "a dLLM reports the log-probability of each "
                                                                 "committed token only: use 0")
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":
            raise unsupported("response_format", self.response_format, "constrained (JSON) decoding is not "
                                                                       "available; use {'type': 'text'}")
        if self.tools:
            raise unsupported("tools", f"{len(self.tools)} tools", "tool calling is not available; omit tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise unsupported("tool_choice", self.tool_choice, "tool calling is not available")

    @property
    def want_logprobs(self) -> bool:
        return bool(self.logprobs)


def parse_request(raw: bytes, model_cls: type[_Request]) -> _Request:
    """Malformed JSON, a non-object body, schema violations and bad text all become 400s naming the field."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON ({e}): send a JSON object", code="invalid_json") from e
    except RecursionError as e:
        raise APIError(400, "request body nests too deeply: send a flat JSON object", code="invalid_json") from e
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    check_text(data)
    for name in ("prompt", "messages"):
        if name in data and data[name] in ("", []):
            raise APIError(400, f"{name} is empty: send at least one {'prompt' if name == 'prompt' else 'message'}",
                           param=name, code="empty_prompt")
    try:
        req = model_cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = _param(err["loc"])
        if err["type"] == "missing":
            message = f"missing required argument {param!r}"
        elif err["type"] in BOUNDS and len(err.get("ctx") or {}) == 1:
            # pydantic's message says "<= 18446744073709552000" for SEED_MAX; its ctx keeps the exact int
            word, limit = BOUNDS[err["type"]], next(iter(err["ctx"].values()))
            message = f"invalid value for {param!r}: must be {word} {limit} (got {_short(err.get('input'))})"
        else:
            message = f"invalid value for {param!r}: {err['msg']} (got {_short(err.get('input'))})"
        raise APIError(400, message, param=param, code=err["type"]) from e
    except RecursionError as e:
        raise APIError(400, "request body nests too deeply: send a flat JSON object", code="invalid_json") from e
    if req.model_extra:
        logger.info("ignoring unknown request fields %s", sorted(req.model_extra))
    req.check_unsupported()
    return req


_TYPE_TAG = re.compile(r"[\[\]-]|^(str|int|float|bool|list|dict|none|function-.*)$")


def _param(loc: tuple) -> str | None:
    """The request path of a validation error, without pydantic's union-member tags ("constrained-str")."""
    parts = []
    for part in loc:
        if isinstance(part, str) and _TYPE_TAG.search(part):
            break
        parts.append(str(part))
    return ".".join(parts) or None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_text(data: Any) -> None:
    """Every string must be valid Unicode text (no lone surrogates): a 400 naming where one is not."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise APIError(400, f"{where or 'body'} holds a lone surrogate ({e.reason} at {e.start}): send "
                                        "valid UTF-8 text", param=where or None, code="invalid_text") from e
        elif isinstance(value, dict):
            stack.extend((v, f"{where}.{k}" if where else str(k)) for k, v in value.items())
            stack.extend((k, f"{where}.<key>" if where else "<key>") for k in value)
        elif isinstance(value, list):
            stack.extend((v, f"{where}.{i}") for i, v in enumerate(value))


# ---------------------------------------------------------------- sampler parameters

def field_types(params_cls: type) -> dict[str, tuple[type, bool]]:
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
        raise APIError(400, f"sampler_params.{name}={_short(value)} has the wrong type: expected a {kind.__name__}",
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


def resolve_params(cfg: ServeConfig, req: _Request) -> tuple[Any, int | None]:
    """The sampler parameters for ``req`` and the response cap (``max_tokens``) to apply, or a 400."""
    params_cls = type(cfg.default_params())
    types_ = field_types(params_cls)
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
    if req.n > cfg.max_batch_size:
        raise APIError(400, f"n={req.n} exceeds this deployment's max_batch_size {cfg.max_batch_size}", param="n",
                       code="out_of_range")
    return params, max_tokens


def check_prompt(prompt_ids: list[int], gen_length: int, max_seq_len: int, vocab_size: int, param: str) -> None:
    """The decoder's prompt check (:func:`~d3core.samplers.base.validate_prompts`) at the HTTP edge, as a 400.

    ``gen_length`` is ``max_tokens`` rounded up to whole blocks."""
    try:
        validate_prompts([prompt_ids], gen_length, max_seq_len, vocab_size, name=param)
    except PromptError as e:
        raise APIError(400, str(e), param=param, code=e.code) from e

