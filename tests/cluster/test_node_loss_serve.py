"""Node loss under load on Ray Serve: 2 model replicas pinned to 2 worker nodes, one node killed mid-load.

The lost node's in-flight requests end with a 503 (or a stream's error event), counted; no request
hangs (every client has a bounded timeout); the replica on the surviving node keeps answering; and
Serve's controller starts a replacement replica on the replacement node. The model is read from the
S3 server, as a replacement node on a real cluster would read it.
"""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest

from cluster_env import WORKER, alive_worker_node_ids, free_port, make_bucket, nodes_of_actors, s3, wait_until
from node_loss import report

pytestmark = [pytest.mark.cluster, pytest.mark.cluster_full, pytest.mark.slow]

APP = "d3ray-node-loss"
REPLICA = f"ServeReplica:{APP}:D3LLMModel"
INGRESS = f"ServeReplica:{APP}:OpenAIIngress"
TIMEOUT_S = 30.0  # the deployment's request timeout; clients give up 15 s later (a hang would show as a timeout)
LOAD_S = 40.0  # seconds of load; the node is removed LOSS_AT_S into it
LOSS_AT_S = 8.0


def chat(client: httpx.Client, url: str, question: str, stream: bool) -> str:
    """``ok`` or how the request failed (an HTTP status, ``stream-error``, or the client exception's name)."""
    body = {"model": "d3ray-tiny", "messages": [{"role": "user", "content": question}], "temperature": 0,
            "stream": stream}
    try:
        if not stream:
            reply = client.post(f"{url}/v1/chat/completions", json=body)
            return "ok" if reply.status_code == 200 and reply.json()["choices"] else str(reply.status_code)
        with client.stream("POST", f"{url}/v1/chat/completions", json=body) as reply:
            if reply.status_code != 200:
                return str(reply.status_code)
            events = [line.removeprefix("data: ") for line in reply.iter_lines() if line.startswith("data: ")]
        errors = [e for e in events if e != "[DONE]" and "error" in json.loads(e)]
        return "ok" if events and events[-1] == "[DONE]" and not errors else "stream-error"
    except httpx.TimeoutException:
        return "timeout"
    except httpx.TransportError as err:
        return type(err).__name__


def test_a_worker_node_lost_under_load_fails_only_its_requests_and_serve_replaces_the_replica(cluster):
    from ray import serve

    from d3core.eval import synthetic
    from d3core.models.shipped import TINY_TEACHER_DIR
    from serve_apps.openai_app import app_builder

    bucket = make_bucket("d3ray-serve-loss")
    s3().put(str(TINY_TEACHER_DIR), f"{bucket.removeprefix('s3://')}/model", recursive=True)
    questions = [p.question for p in synthetic.generate("test", 16, seed=3)]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app_builder({"preset": "tiny", "model": f"{bucket}/model", "num_replicas": 2,
                               "resources": {WORKER: 1}, "request_timeout_s": TIMEOUT_S, "max_batch_size": 8,
                               "max_queued_requests": 4}), name=APP, route_prefix="/")
        replicas = nodes_of_actors(cluster, REPLICA)
        assert len(replicas) == 2 and len(set(replicas.values())) == 2, replicas  # one replica per worker node
        assert set(replicas.values()) <= alive_worker_node_ids()
        ingress = set(nodes_of_actors(cluster, INGRESS).values())
        victim = sorted(set(replicas.values()) - ingress)[0]  # a node with a model replica, not the ingress
        before = alive_worker_node_ids()

        results: list[tuple[float, float, str]] = []  # (sent, finished, outcome)
        removed_at = None

        def one(i: int) -> None:
            sent = time.monotonic()
            with httpx.Client(timeout=TIMEOUT_S + 15) as client:
                outcome = chat(client, url, questions[i % 16], stream=i % 3 == 0)
            results.append((sent, time.monotonic(), outcome))

        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = []
            i = 0
            while time.monotonic() - start < LOAD_S:
                futures = [f for f in futures if not f.done()]
                while len(futures) < 6:  # 6 requests in flight at all times
                    futures.append(pool.submit(one, i))
                    i += 1
                if removed_at is None and time.monotonic() - start > LOSS_AT_S:
                    removed_at = cluster.remove(victim)
                    cluster.add_worker()
                time.sleep(0.05)
            concurrent.futures.wait(futures, timeout=TIMEOUT_S + 30)
            sent = i
        replacement = wait_until(lambda: alive_worker_node_ids() - before, 60, "the replacement node")
        replaced = wait_until(lambda: set(nodes_of_actors(cluster, REPLICA).values()) & replacement, 180,
                              "a model replica on the replacement node")
        recovered_at = time.monotonic()
        with httpx.Client(timeout=TIMEOUT_S + 15) as client:
            after = [chat(client, url, q, stream=False) for q in questions[:4]]
    finally:
        serve.shutdown()

    outcomes = [o for _, _, o in results]
    failed = [o for o in outcomes if o != "ok"]
    in_flight_at_loss = [o for s, f, o in results if s <= removed_at <= f]
    successes = sorted(f for _, f, o in results if o == "ok" and f > removed_at)
    gaps = [b - a for a, b in zip([removed_at, *successes], successes)]
    record = report("serve", removed=f"worker node {victim[:8]} (1 of 2 model replicas)",
                    when=f"{LOSS_AT_S:.0f} s into {LOAD_S:.0f} s of load, 6 requests in flight",
                    requests=len(outcomes), failed=len(failed), failed_as=sorted(set(failed)),
                    in_flight_at_loss=len(in_flight_at_loss),
                    failed_of_those=sum(o != "ok" for o in in_flight_at_loss),
                    hung=sum(o == "timeout" for o in outcomes), seconds_without_service=round(max(gaps), 1),
                    replica_replaced_after_s=round(recovered_at - removed_at, 1),
                    max_latency_s=round(max(f - s for s, f, _ in results), 1))
    assert len(results) == sent, "a request never came back"
    assert record["hung"] == 0 and record["max_latency_s"] < TIMEOUT_S + 15
    assert set(failed) <= {"503", "stream-error"}, failed  # clear failures, never a 500 or a dropped connection
    assert len(failed) <= len(in_flight_at_loss) + 6, (failed, in_flight_at_loss)  # only what the lost node held
    assert successes, "no request succeeded after the loss"
    assert record["seconds_without_service"] < 15, gaps
    assert replaced and after == ["ok"] * 4
