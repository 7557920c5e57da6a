"""Liveness and readiness without Ray (issue 33, item 1): what the probes read, and that they never wait.

The repros: after one of two replicas was killed, ``/health`` and ``/ready`` answered 503 for 8-10 s
(the controller called the deployment UNHEALTHY while one replica served every request), and under
load ``/health`` took up to 21 s (it queried the controller on the request path).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import pytest
from ray.exceptions import RayActorError

from serve_apps.config import ServeConfig


class _Never:
    """A handle call that never returns (a replica stuck behind decoding)."""

    def __await__(self):
        return asyncio.get_running_loop().create_future().__await__()

    def cancel(self) -> None:
        pass


@pytest.fixture
def stuck_ingress(monkeypatch):
    """The real ingress class, built in process, whose controller and model would both block for 5 s."""
    from ray import serve

    import serve_apps.openai_app as module

    release = threading.Event()

    def slow_status():
        release.wait(5)
        raise RuntimeError("the controller is busy")

    monkeypatch.setattr(serve, "status", slow_status)
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(app_name="d3ray"))
    model = SimpleNamespace(stats=SimpleNamespace(remote=lambda: _Never()))
    before = dict(module._INGRESS)
    own = module.OpenAIIngress.func_or_class.__mro__[1]  # the class as written, under Serve's ASGI wrapper
    ingress = own(model, ServeConfig.from_preset("tiny"))
    yield ingress, release
    release.set()
    module._INGRESS.clear()
    module._INGRESS.update(before)


def test_liveness_answers_from_the_ingress_alone_and_readiness_never_waits(stuck_ingress):
    stuck_ingress, release = stuck_ingress

    async def probe(route):
        t0 = time.monotonic()
        response = await asyncio.wait_for(route(), timeout=2.0)
        return response, time.monotonic() - t0

    async def run():
        live, live_s = await probe(stuck_ingress.health)
        ready, ready_s = await probe(stuck_ingress.ready)  # starts the watch; answers from its (empty) view
        await asyncio.sleep(0.2)
        again, again_s = await probe(stuck_ingress.health)
        stuck_ingress.watch.stop()  # (the code before issue 33 fails before here: its /health waited on the controller)
        release.set()  # let the hanging controller query end before the loop closes
        return (live, live_s), (ready, ready_s), (again, again_s)

    (live, live_s), (ready, ready_s), (again, again_s) = asyncio.run(run())
    assert live.status_code == 200 and json.loads(live.body)["status"] == "ok" and live_s < 0.1, live_s
    assert again.status_code == 200 and again_s < 0.1, again_s  # with the watch's queries hanging beside it
    assert ready.status_code == 503 and ready.headers["retry-after"] == "1" and ready_s < 0.1, ready_s
    assert json.loads(ready.body)["status"] == "unavailable"  # no replica has answered yet


def _watch(states, answers):
    """A watch over a controller that reports ``states`` and a replica whose calls follow ``answers``."""
    from serve_apps.health import ModelWatch

    calls = iter(answers)

    async def ping():
        outcome = next(calls)
        if outcome != "ok":
            raise RayActorError()
        return {}

    return ModelWatch(lambda: (dict(states), "UNHEALTHY"), ping, period_s=0.01, stale_s=0.5)


def test_a_replica_restarting_beside_a_serving_one_leaves_the_deployment_ready():
    # The repro's controller view: {"RUNNING": 1, "STARTING": 1}, deployment UNHEALTHY; the killed
    # replica fails the one call the router still sends it, the other answers.
    watch = _watch({"RUNNING": 1, "STARTING": 1}, ["ok", "error", "ok"])

    async def run():
        seen = []
        for _ in range(3):
            await watch.refresh()
            seen.append(watch.ready())
        return seen

    for ready, detail in asyncio.run(run()):
        assert ready, detail
    assert detail["replicas"] == {"RUNNING": 1, "STARTING": 1} and detail["deployment"] == "UNHEALTHY"


def test_not_ready_without_a_running_replica_or_after_replicas_stop_answering():
    nobody = _watch({"STARTING": 2}, ["ok"])
    asyncio.run(nobody.refresh())
    assert not nobody.ready()[0]
    silent = _watch({"RUNNING": 1}, ["ok", "error", "error"])

    async def run():
        await silent.refresh()
        ready_then = silent.ready()[0]
        await asyncio.sleep(0.6)  # past stale_s with no answer
        await silent.refresh()
        return ready_then, silent.ready()

    ready_then, (ready_now, detail) = asyncio.run(run())
    assert ready_then and not ready_now and detail["replica_answered_s_ago"] > 0.5


def test_a_hanging_controller_keeps_the_last_view_and_gets_one_query_at_a_time():
    release = threading.Event()
    calls = []

    def controller():
        calls.append(1)
        if len(calls) > 1:
            release.wait(5)
        return {"RUNNING": 2}, "HEALTHY"

    async def ping():
        return {}

    from serve_apps.health import ModelWatch

    watch = ModelWatch(controller, ping, status_timeout_s=0.05)

    async def run():
        for _ in range(4):
            await watch.refresh()
        release.set()
        await asyncio.sleep(0.05)

    asyncio.run(run())
    ready, detail = watch.ready()
    assert ready and detail["replicas"] == {"RUNNING": 2} and "did not answer" in detail["error"]
    assert len(calls) == 2  # the hanging query was waited on again, never started twice
