"""The OpenAI app over real HTTP on 127.0.0.1 with the official ``openai`` client.

One Serve application (tiny preset, 2 CPU replicas of the model deployment) is shared by the
module; the replica-kill test runs last because it disturbs the app.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import time
import urllib.request

import httpx
import openai
import pytest
import ray
import torch
from ray import serve

from d3core.eval import synthetic
from d3core.models.shipped import load_tiny_teacher, load_tiny_tokenizer
from d3core.samplers import get_sampler
from d3core.sft import encode_prompt
from serve_apps.config import ServeConfig
from serve_apps.openai_app import app_builder

APP = "d3ray-test"
MODEL = "d3ray-tiny"
TIMEOUT_S = 30.0  # the deployment's per-request timeout; clients wait a little longer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the in-process reference decode; replicas set their own
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def server():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder({"preset": "tiny", "num_replicas": 2, "request_timeout_s": TIMEOUT_S,
                           "batch_wait_timeout_s": 0.02}), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S + 15)


@pytest.fixture(scope="module")
def questions():
    return [p.question for p in synthetic.generate("test", 16, seed=21)]


def chat(client, question, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                          temperature=0, **kw)


def stream_chat(client, question):
    chunks, usage, finish = [], None, None
    for chunk in chat(client, question, stream=True):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                chunks.append(choice.delta.content)
            finish = choice.finish_reason or finish
    return chunks, usage, finish


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(f"{server}/health", timeout=30).json()
    assert health["status"] == "ok" and health["model"] == MODEL


def test_chat_matches_the_sampler_and_reports_usage(client, questions):
    tok = load_tiny_tokenizer()
    cfg = ServeConfig.from_preset("tiny")
    ref = get_sampler("d3llm").generate(load_tiny_teacher(), [encode_prompt(tok, questions[0])], cfg.default_params())
    seq = ref.sequences[0]
    resp = chat(client, questions[0])
    assert resp.choices[0].message.content == tok.decode(seq.response_ids, skip_special_tokens=True)
    assert resp.choices[0].finish_reason == "stop"
    u = resp.usage
    assert u.completion_tokens == len(seq.response_ids) and u.prompt_tokens == len(seq.prompt_ids)
    assert u.model_extra["nfe"] == seq.nfe and u.model_extra["tpf"] == pytest.approx(seq.tpf, abs=1e-3)
    assert u.model_extra["tpf"] > 1.0  # parallel decoding: more than one token per forward


def test_completion_with_max_tokens(client, questions):
    tok = load_tiny_tokenizer()
    prompt = tok.decode(encode_prompt(tok, questions[1]))
    full = client.completions.create(model=MODEL, prompt=prompt, temperature=0)
    cut = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=5)
    assert full.choices[0].finish_reason == "stop" and full.usage.completion_tokens > 5
    assert cut.usage.completion_tokens == 5 and cut.choices[0].finish_reason == "length"
    assert full.choices[0].text.startswith(cut.choices[0].text)
    assert full.usage.model_extra["nfe"] > 0


def test_streamed_text_equals_non_streamed_text(client, questions):
    for q in questions[2:4]:
        chunks, usage, finish = stream_chat(client, q)
        plain = chat(client, q)
        assert "".join(chunks) == plain.choices[0].message.content
        assert len(chunks) >= 3, "committed tokens should arrive over several steps"
        assert finish == "stop" and usage.completion_tokens == plain.usage.completion_tokens
        assert usage.model_extra["nfe"] == plain.usage.model_extra["nfe"]
    completion = dict(model=MODEL, prompt="we have 9 . add + 4 =", temperature=0, max_tokens=12)
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **completion))
    assert streamed == client.completions.create(**completion).choices[0].text


def test_16_concurrent_requests_equal_one_by_one(client, questions):
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda q: chat(client, q), questions))
    alone = [chat(client, q) for q in questions]
    assert [r.choices[0].message.content for r in together] == [r.choices[0].message.content for r in alone]
    assert max(r.usage.model_extra["batch_size"] for r in together) > 1, "concurrent requests were not batched"
    assert all(r.usage.model_extra["batch_size"] == 1 for r in alone)


@pytest.mark.parametrize("body,status,param", [
    (b'{"model": "d3ray-tiny", "prompt": ', 400, None),
    (b'{"model": "gpt-4", "prompt": "hi"}', 404, "model"),
    (b'{"model": "d3ray-tiny", "prompt": ""}', 400, "prompt"),
    (json.dumps({"model": MODEL, "prompt": "we have 9 . " * 40}).encode(), 400, "prompt"),
    (b'{"model": "d3ray-tiny", "prompt": "hi", "temperature": "warm"}', 400, "temperature"),
    (b'{"model": "d3ray-tiny", "prompt": "hi", "sampler_params": {"threshold": -1}}', 400,
     "sampler_params.threshold"),
    (b'{"model": "d3ray-tiny", "prompt": "hi", "max_tokens": 100000}', 400, "max_tokens"),
])
def test_bad_requests_get_openai_error_bodies(server, body, status, param):
    r = httpx.post(f"{server}/v1/completions", content=body, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"sampler_params": {"threshold": "high"}})
    assert e.value.body["param"] == "sampler_params.threshold"
    with pytest.raises(openai.BadRequestError):  # a streaming request fails before the stream starts
        client.chat.completions.create(model=MODEL, messages=[{"role": "bot", "content": "hi"}], stream=True)


def test_prometheus_metrics_are_exported(client, questions):
    chat(client, questions[0])
    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline = time.monotonic() + 40
    text = ""
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        if "d3ray_batch_size" in text and "d3ray_http_requests" in text:
            break
        time.sleep(2)
    for name in ("d3ray_requests_total", "d3ray_request_latency_seconds", "d3ray_generated_tokens_total",
                 "d3ray_tokens_per_second", "d3ray_tpf", "d3ray_nfe", "d3ray_batch_size", "d3ray_http_requests"):
        assert name in text, f"{name} missing from the Prometheus export"


def _replicas() -> list[str]:
    names = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in names if a["namespace"] == "serve" and "D3LLMModel" in a["name"]
                  and a["name"].startswith("SERVE_REPLICA"))


@pytest.mark.slow
def test_killing_a_replica_mid_load_recovers_without_hangs(server, client, questions):
    replicas = _replicas()
    assert len(replicas) == 2, replicas
    results = []  # (ok, seconds, finished_at)
    codes = []  # how failed requests failed

    def one(i):
        started = time.monotonic()
        try:
            if i % 3 == 0:
                chunks, usage, _ = stream_chat(client, questions[i % 16])
                ok = usage is not None
            else:
                chat(client, questions[i % 16])
                ok = True
        except openai.APIStatusError as e:  # the killed replica's requests: 503, never a 500
            ok = False
            codes.append(e.status_code)
        except openai.APIError:  # a stream that ended in an OpenAI error event
            ok = False
            codes.append("stream-error")
        results.append((ok, time.monotonic() - started, time.monotonic()))

    stop_at = time.monotonic() + 20
    killed_at = None
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = []
        for i in range(60):  # bounded in count and in time
            if time.monotonic() > stop_at:
                break
            futures.append(pool.submit(one, i))
            if i == 12:
                ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=False)
                killed_at = time.monotonic()
            time.sleep(0.1)
        concurrent.futures.wait(futures, timeout=TIMEOUT_S + 30)
    assert killed_at is not None and len(results) == len(futures), "a request hung"
    failed = sum(not ok for ok, _, _ in results)
    print(f"kill test: {len(results)} requests, {failed} failed {codes}, max latency "
          f"{max(sec for _, sec, _ in results):.2f} s")
    assert max(sec for _, sec, _ in results) < TIMEOUT_S + 15, "a request ran past its timeout"
    assert set(codes) <= {503, "stream-error"}, codes
    assert any(ok for ok, _, t in results if t > killed_at + 1), "no request succeeded after the kill"

    # the controller replaces the dead replica; requests keep succeeding throughout
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        status = serve.status().applications[APP].deployments["D3LLMModel"]
        running = status.replica_states.get("RUNNING", 0)
        if running == 2 and replicas[0] not in _replicas():
            break
        time.sleep(2)
    assert running == 2 and replicas[0] not in _replicas(), f"dead replica not replaced: {status}"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        after = list(pool.map(lambda q: chat(client, q), questions[:8]))
    assert all(r.choices[0].finish_reason == "stop" for r in after)
