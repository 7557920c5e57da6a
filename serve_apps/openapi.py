"""The served OpenAPI schema: request bodies and every error response the app can send.

The routes read their bodies themselves (strict parsing with OpenAI-style errors), so FastAPI
would show no request body and a 422 that never happens. This fills in the request models'
JSON schemas, the error responses (OpenAI's error body), and drops the 422s.
"""

from __future__ import annotations

from typing import Any, Callable

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from serve_apps.protocol import ChatCompletionRequest, CompletionRequest

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}
ERRORS = {
    "400": "Malformed JSON, a wrong field type or range, an unsupported value, a prompt that does not fit",
    "401": "Missing or incorrect API key (when the server has one)",
    "404": "Unknown model or route",
    "408": "The request passed its timeout",
    "413": "The request body is larger than the server's limit",
    "429": "The queues are full: retry after the Retry-After header's seconds",
    "503": "No replica could serve the request: retry",
}
BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}


def _responses(codes: list[str]) -> dict[str, Any]:
    return {code: {"description": ERRORS[code],
                   "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            for code in codes}


def _tighten(body: dict[str, Any], limits: dict[str, Any]) -> None:
    """This deployment's own bounds (model name, n, max_tokens, temperature) in a request schema."""
    props = body.get("properties", {})
    if "model" in limits and "model" in props:
        props["model"] = {"type": "string", "enum": [limits["model"]]}
    for name, key in (("n", "max_n"), ("max_tokens", "max_tokens"), ("max_completion_tokens", "max_tokens")):
        if key in limits and name in props:
            props[name].setdefault("maximum", limits[key])
            for option in props[name].get("anyOf", []):
                if option.get("type") == "integer":
                    option["maximum"] = limits[key]
    if "sampler_params" in limits and "sampler_params" in props:
        props["sampler_params"] = {"anyOf": [{"type": "object", "additionalProperties": False,
                                              "properties": limits["sampler_params"]}, {"type": "null"}],
                                   "description": "Overrides of this deployment's sampler parameters"}
    if "vocab" in limits and "prompt" in props:
        _bound_ids(props["prompt"], limits["vocab"])
    if "max_temperature" in limits and "temperature" in props:
        for option in props["temperature"].get("anyOf", [props["temperature"]]):
            if option.get("type") == "number":
                option["maximum"] = limits["max_temperature"]


_KEYWORDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def _standard(node: Any) -> None:
    """pydantic writes ``ge``/``le`` for constrained validator-wrapped ints: use JSON Schema's names."""
    if isinstance(node, dict):
        if node.get("type") in ("integer", "number"):
            for old, new in _KEYWORDS.items():
                if old in node:
                    node[new] = node.pop(old)
        for value in node.values():
            _standard(value)
    elif isinstance(node, list):
        for value in node:
            _standard(value)


def _bound_ids(node: Any, vocab: int) -> None:
    """Token-id arrays of a prompt schema hold ids in [0, vocab)."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node.update(minimum=0, maximum=vocab - 1)
        for value in node.values():
            _bound_ids(value, vocab)
    elif isinstance(node, list):
        for value in node:
            _bound_ids(value, vocab)


def build_schema(app: FastAPI, limits: dict[str, Any] | None = None) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                         description="OpenAI-compatible dLLM server (d3ray). See docs/serving.md for every field.")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["ErrorResponse"] = ERROR_SCHEMA
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            codes = ["401", "404"] if path.startswith("/v1") else []
            if path in BODIES and method == "post":
                model = BODIES[path]
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                _standard(body)
                _tighten(body, limits or {})
                components[model.__name__] = body
                op["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
                codes = list(ERRORS)
                responses["200"]["content"] = {"application/json": {"schema": {"type": "object"}},
                                               "text/event-stream": {"schema": {}}}
            elif path in ("/health", "/ready"):
                codes = ["503"]
            elif path == "/metrics":
                responses["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
            if "{model_id}" in path and limits and "model" in limits:
                for param in op.get("parameters", []):
                    if param.get("name") == "model_id":
                        param["schema"] = {"type": "string", "examples": [limits["model"]]}
                        param["example"] = limits["model"]
            responses.update(_responses(codes))
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema


def install_openapi(app: FastAPI, limits: Callable[[], dict[str, Any]] | None = None) -> None:
    """Serve :func:`build_schema`; ``limits()`` gives the running deployment's bounds (``{}`` before it runs)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            bounds = limits() if limits is not None else {}
            schema = build_schema(app, bounds)
            if not bounds:
                return schema  # not serving yet: do not cache a schema without the deployment's bounds
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
