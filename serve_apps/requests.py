"""What :class:`~serve_apps.batching.ContinuousEngine` takes and gives: requests, outputs, errors, a metrics hook.

:class:`GenerationRequest` is one request (prompt ids, sampler parameters, output options) and
:class:`GenerationOutput` its answer (one :class:`~serve_apps.outputs.Choice` per completion, with
the request's timings and decode costs). The exceptions end one request: a passed deadline, a shut
engine, a full admission queue (with a retry delay), a request the engine could not decode.
:class:`EngineMetrics` is the interface of the engine's optional metrics recorder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from serve_apps.outputs import Choice


class EngineTimeout(Exception):
    """The request passed its deadline before it finished."""


class EngineClosed(Exception):
    """The engine was shut down."""


class EngineOverloaded(Exception):
    """The admission queue is full; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestFailed(Exception):
    """The engine could not decode this request (the cause is in the message); other requests go on."""


@dataclass(frozen=True)
class GenerationRequest:
    """One request: prompt ids, sampler parameters (a validated frozen dataclass) and output options."""

    prompt_ids: tuple[int, ...]
    params: Any
    max_tokens: int | None = None
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    timeout_s: float = 60.0
    request_id: str = ""

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s={self.timeout_s}: must be > 0 seconds")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens}: must be >= 1 or None")
        if self.n < 1:
            raise ValueError(f"n={self.n}: must be >= 1")


@dataclass(frozen=True)
class GenerationOutput:
    choices: tuple[Choice, ...]
    prompt_tokens: int
    batch_size: int  # the most rows that shared a step with this request's rows
    queue_s: float
    decode_s: float

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)

    @property
    def nfe(self) -> int:
        return sum(c.nfe for c in self.choices)

    @property
    def tokens_computed(self) -> int:
        return sum(c.tokens_computed for c in self.choices)

    @property
    def tokens_committed(self) -> int:
        return sum(c.tokens_committed for c in self.choices)


class EngineMetrics(Protocol):
    def on_step(self, rows: int, seconds: float, tokens: int) -> None: ...

    def on_request(self, status: str, output: GenerationOutput | None) -> None: ...
