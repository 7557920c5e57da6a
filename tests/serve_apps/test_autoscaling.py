"""Autoscaling reacts (issue 33, item 3): a load beyond one replica's rows adds a replica within seconds.

The repro: with ``upscale_delay_s`` 2 (``serve_apps/config/tiny.yaml``), 16 clients did not bring up
a second replica within 15 s. Serve's defaults push load metrics every 10 s and average them over
30 s; ``ServeConfig.autoscaling_options`` now reports every 0.5 s over a 2 s window
(``AUTOSCALING_DEFAULTS``). This module starts its own Serve app (autoscaling 1-2 replicas) and
runs 16 closed-loop clients, a full batch of one replica, twice its target of 8 ongoing requests,
for at most ``LOAD_S``: the controller must start a second replica within
``SCALE_UP_DECIDED_WITHIN_S`` and it must be RUNNING within ``SECOND_REPLICA_RUNNING_WITHIN_S``.
"""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import ray
from ray import serve

from d3core.eval import synthetic
from serve_apps.openai_app import app_builder

APP = "d3ray-autoscale"
MODEL = "d3ray-tiny"
# tiny.yaml's autoscaling block as the reviewers ran it (no metrics_interval_s / look_back_period_s)
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1, "target_ongoing_requests": 8,
               "upscale_delay_s": 2, "downscale_delay_s": 60}
CLIENTS = 16
LOAD_S = 30.0  # the load stops once the second replica runs, or after this
# docs/serving.md states both bounds. The controller decides within seconds; a new replica then imports
# torch and loads the model on cores its busy sibling and the clients already use (~15 s here).
SCALE_UP_DECIDED_WITHIN_S = 8.0
SECOND_REPLICA_RUNNING_WITHIN_S = LOAD_S


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_states() -> dict:
    return {str(k): v for k, v in serve.status().applications[APP].deployments["D3LLMModel"].replica_states.items()}


def running_replicas() -> int:
    return replica_states().get("RUNNING", 0)


@pytest.mark.slow
def test_a_load_beyond_one_replica_brings_up_a_second_within_the_stated_time():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app_builder({"preset": "tiny", "num_replicas": None, "autoscaling": AUTOSCALING}), name=APP,
                  route_prefix="/")
        assert running_replicas() == 1
        questions = [p.question for p in synthetic.generate("test", CLIENTS, seed=3)]
        stop, codes = threading.Event(), []

        def client(i: int) -> None:
            body = {"model": MODEL, "temperature": 0, "messages": [{"role": "user", "content": questions[i]}]}
            with httpx.Client(timeout=60) as http:
                while not stop.is_set():
                    codes.append(http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body).status_code)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
        started = time.monotonic()
        for t in threads:
            t.start()
        second_at = starting_at = None
        while time.monotonic() - started < LOAD_S:
            states = replica_states()
            if starting_at is None and sum(states.values()) >= 2:
                starting_at = time.monotonic() - started  # the controller decided to scale up
            if states.get("RUNNING", 0) >= 2:
                second_at = time.monotonic() - started
                break
            time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(60)
        print(f"second replica started after {starting_at} s and RUNNING after {second_at} s of load; "
              f"{len(codes)} requests, {codes.count(200)} answered, others {sorted(set(codes) - {200})}")
        assert starting_at is not None and starting_at <= SCALE_UP_DECIDED_WITHIN_S, starting_at
        assert second_at is not None and second_at <= SECOND_REPLICA_RUNNING_WITHIN_S, second_at
        assert codes and set(codes) <= {200, 429}, set(codes)
    finally:
        serve.shutdown()
        ray.shutdown()
