"""Liveness and readiness of the OpenAI app, as Kubernetes and vLLM mean them.

* ``GET /health`` (liveness): this ingress process answers. The answer comes from the ingress's
  own state only: no call to the model deployment, no query to Serve's controller, nothing that
  can wait behind decoding or behind a busy controller. It is 200 whenever the ingress can answer
  at all; a probe that times out is the failure a liveness probe exists to catch (a stuck event
  loop). A replica lost or restarting is not a reason to restart the ingress.
* ``GET /ready`` (readiness): a model replica can take a request now. :class:`ModelWatch`, a
  background task of the ingress, asks the controller for the model deployment's replica states
  and calls one replica (``D3LLMModel.stats``, through the same router as requests) every
  ``PERIOD_S``; the probe reads its latest result. Ready means: the controller's latest view has a
  RUNNING replica and a replica answered within the last ``STALE_S`` seconds. A replica restarting
  beside a serving one changes neither; load changes neither either (a busy server is still
  ready: its overload answer is a 429 per request, not a pod taken out of the Service).

Both bodies carry what the ingress knows (replica states, rows in use, expected wait), for people.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse
from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException

logger = logging.getLogger(__name__)

PERIOD_S = 1.0  # how often the watch refreshes
STATUS_TIMEOUT_S = 5.0  # a controller query slower than this leaves the last view in place
PING_TIMEOUT_S = 2.0  # a replica call slower than this does not count as an answer
STALE_S = 5.0  # readiness holds this long after the last answer (a killed replica fails one call)


@dataclass(frozen=True)
class View:
    """The controller's view of the model deployment at monotonic time ``at``."""

    replicas: Mapping[str, int] = field(default_factory=dict)  # replica state -> count
    deployment: str = "UNKNOWN"
    at: float = 0.0


class ModelWatch:
    """The model deployment as the probes see it, refreshed in the background (see the module docstring).

    ``controller()`` (blocking; run on a worker thread) returns the replica states and the
    deployment status; ``ping()`` returns an awaitable call to one replica.
    """

    def __init__(self, controller: Callable[[], tuple[dict[str, int], str]], ping: Callable[[], Any],
                 period_s: float = PERIOD_S, stale_s: float = STALE_S, ping_timeout_s: float = PING_TIMEOUT_S,
                 status_timeout_s: float = STATUS_TIMEOUT_S) -> None:
        self.controller, self.ping = controller, ping
        self.period_s, self.stale_s = period_s, stale_s
        self.ping_timeout_s, self.status_timeout_s = ping_timeout_s, status_timeout_s
        self.view = View()
        self.answered = 0.0  # monotonic time a replica last answered (0: never)
        self.error: str | None = None
        self._task: asyncio.Task | None = None
        self._query: asyncio.Future | None = None  # a controller query still running on its thread

    def start(self) -> None:
        """Start (or restart, after a crash) the background refresh on the running loop; idempotent."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="d3ray-model-watch")
            self._task.add_done_callback(_log_crash)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.period_s)

    async def refresh(self) -> None:
        await asyncio.gather(self._refresh_view(), self._ping())

    async def _refresh_view(self) -> None:
        if self._query is None or self._query.done():  # never two queries at once behind a slow controller
            self._query = asyncio.ensure_future(asyncio.to_thread(self.controller))
        try:
            replicas, deployment = await asyncio.wait_for(asyncio.shield(self._query), self.status_timeout_s)
        except asyncio.TimeoutError:
            self.error = f"the controller did not answer within {self.status_timeout_s:g} s"
            return
        except (RayError, RayServeException, KeyError, AttributeError) as e:
            self.error = f"controller status unavailable ({type(e).__name__}: {e})"
            return
        self.view, self.error = View(dict(replicas), deployment, time.monotonic()), None

    async def _ping(self) -> None:
        call = self.ping()
        try:
            await asyncio.wait_for(_await(call), self.ping_timeout_s)
        except asyncio.TimeoutError:
            getattr(call, "cancel", lambda: None)()
            return
        except (RayError, RayServeException):  # e.g. the replica it reached was just killed
            return
        self.answered = time.monotonic()

    @property
    def running(self) -> int:
        return int(self.view.replicas.get("RUNNING", 0))

    def ready(self) -> tuple[bool, dict[str, Any]]:
        now = time.monotonic()
        answered_ago = now - self.answered if self.answered else None
        ready = self.running > 0 and answered_ago is not None and answered_ago <= self.stale_s
        detail = {"replicas": dict(self.view.replicas), "deployment": self.view.deployment,
                  "view_age_s": round(now - self.view.at, 3) if self.view.at else None,
                  "replica_answered_s_ago": None if answered_ago is None else round(answered_ago, 3)}
        if self.error:
            detail["error"] = self.error
        return ready, detail


async def _await(call) -> Any:
    return await call


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("the model watch stopped (%r); the next probe restarts it", task.exception())


def liveness(model: str, started: float, own: Mapping[str, Any]) -> JSONResponse:
    """``/health``: 200 from the ingress's own state (``started``: its monotonic start time)."""
    return JSONResponse({"status": "ok", "model": model, "uptime_s": round(time.monotonic() - started, 1), **own})


def readiness(watch: ModelWatch, own: Mapping[str, Any]) -> JSONResponse:
    """``/ready``: 200 while a replica can take a request (the watch's latest view), else 503 + Retry-After."""
    watch.start()
    ready, detail = watch.ready()
    body = {"status": "ready" if ready else "unavailable", **detail, **own}
    return JSONResponse(body, status_code=200 if ready else 503, headers={} if ready else {"Retry-After": "1"})
