"""The OpenAI app over real HTTP on 127.0.0.1 with the official ``openai`` client.

One Serve application (tiny preset, 2 CPU replicas of the model deployment, an API key) is
shared by the module; the replica-kill tests run last because they disturb the app.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import time

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
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
TIMEOUT_S = 30.0  # the deployment's per-request timeout; clients wait a little longer
LIMITS = {"max_batch_size": 8, "max_queued_requests": 4}


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
    serve.run(app_builder({"preset": "tiny", "num_replicas": 2, "request_timeout_s": TIMEOUT_S, "api_key": KEY,
                           **LIMITS}), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT_S + 15)


@pytest.fixture(scope="module")
def questions():
    return [p.question for p in synthetic.generate("test", 16, seed=21)]


def post(server, path, body, headers=AUTH, timeout=30):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server}{path}", content=content, headers=headers, timeout=timeout)


def chat(client, question, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                          temperature=0, **kw)


def stream_chat(client, question, **kw):
    chunks, usage, finish = [], None, None
    for chunk in chat(client, question, stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                chunks.append(choice.delta.content)
            finish = choice.finish_reason or finish
    return chunks, usage, finish


def reference(question):
    tok = load_tiny_tokenizer()
    cfg = ServeConfig.from_preset("tiny")
    seq = get_sampler("d3llm").generate(load_tiny_teacher(), [encode_prompt(tok, question)],
                                        cfg.default_params()).sequences[0]
    return tok.decode(seq.response_ids, skip_special_tokens=True), seq


def test_models_health_ready_and_the_api_key(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(f"{server}/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["model"] == MODEL
    deadline = time.monotonic() + 10  # the watch behind /ready refreshes every second
    while (ready := httpx.get(f"{server}/ready", timeout=30)).json().get("replicas", {}).get("RUNNING") != 2:
        assert time.monotonic() < deadline, ready.json()
        time.sleep(0.5)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(f"{server}/v1/models", headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0).models.list()


def test_chat_matches_the_sampler_and_reports_usage(client, questions):
    text, seq = reference(questions[0])
    resp = chat(client, questions[0])
    assert resp.choices[0].message.content == text
    assert resp.choices[0].finish_reason == "stop"
    u = resp.usage
    assert u.completion_tokens == len(seq.response_ids) and u.prompt_tokens == len(seq.prompt_ids)
    assert u.model_extra["nfe"] == seq.nfe and u.model_extra["tpf"] == pytest.approx(seq.tpf, abs=1e-3)
    assert u.model_extra["tpf"] > 1.0  # parallel decoding: more than one token per forward
    assert u.model_extra["tokens_computed"] == seq.tokens_computed
    assert u.model_extra["token_forwards_per_token"] == pytest.approx(seq.forwards_per_token, abs=1e-3)


def test_completion_with_max_tokens_echo_and_several_prompts(client, questions):
    tok = load_tiny_tokenizer()
    prompts = [tok.decode(encode_prompt(tok, q)) for q in questions[1:3]]
    full = client.completions.create(model=MODEL, prompt=prompts[0], temperature=0)
    cut = client.completions.create(model=MODEL, prompt=prompts[0], temperature=0, max_tokens=5)
    assert full.choices[0].finish_reason == "stop" and full.usage.completion_tokens > 5
    assert cut.usage.completion_tokens == 5 and cut.choices[0].finish_reason == "length"
    assert full.choices[0].text.startswith(cut.choices[0].text)
    echoed = client.completions.create(model=MODEL, prompt=prompts[0], temperature=0, max_tokens=5, echo=True)
    assert echoed.choices[0].text == prompts[0] + cut.choices[0].text
    both = client.completions.create(model=MODEL, prompt=prompts, temperature=0, n=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert both.choices[0].text == both.choices[1].text == full.choices[0].text  # n rows, temperature 0
    alone = client.completions.create(model=MODEL, prompt=prompts[1], temperature=0)
    assert both.choices[2].text == alone.choices[0].text


def test_stop_strings_and_logprobs(client, questions):
    plain = chat(client, questions[4]).choices[0].message.content
    word = plain.split()[2]
    stopped = chat(client, questions[4], stop=[f" {word} ", "zzz"], logprobs=True)
    choice = stopped.choices[0]
    assert choice.message.content == plain[: plain.index(f" {word} ")] and choice.finish_reason == "stop"
    entries = choice.logprobs.content
    assert entries and all(e.logprob <= 0 for e in entries)
    assert "".join(e.token for e in entries) == choice.message.content
    comp = client.completions.create(model=MODEL, prompt="we have 9 . add + 4 =", temperature=0, max_tokens=8,
                                     logprobs=0)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == comp.usage.completion_tokens
    assert "".join(lp.tokens) == comp.choices[0].text
    assert all(comp.choices[0].text[at:].startswith(t) for at, t in zip(lp.text_offset, lp.tokens))
    assert all(v <= 0 for v in lp.token_logprobs)


def test_streamed_text_equals_non_streamed_text(client, questions):
    for q in questions[2:4]:
        chunks, usage, finish = stream_chat(client, q)
        plain = chat(client, q)
        assert "".join(chunks) == plain.choices[0].message.content
        assert len(chunks) >= 3, "committed tokens should arrive over several steps"
        assert finish == "stop" and usage.completion_tokens == plain.usage.completion_tokens
        assert usage.model_extra["nfe"] == plain.usage.model_extra["nfe"]
    completion = dict(model=MODEL, prompt="we have 9 . add + 4 =", temperature=0, max_tokens=12)
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **completion) if c.choices)
    assert streamed == client.completions.create(**completion).choices[0].text
    without_usage = list(chat(client, questions[5], stream=True))
    assert all(c.usage is None for c in without_usage)  # usage only when stream_options.include_usage


def test_16_concurrent_requests_equal_one_by_one(client, questions):
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda q: chat(client, q), questions))
    alone = [chat(client, q) for q in questions]
    assert [r.choices[0].message.content for r in together] == [r.choices[0].message.content for r in alone]
    assert max(r.usage.model_extra["batch_size"] for r in together) > 1, "concurrent requests were not batched"


def test_different_sampler_params_share_batches(client, questions):
    kinds = [{}, {"sampler_params": {"threshold": 0.2}}, {"sampler_params": {"threshold": 1.0}}]
    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        together = list(pool.map(lambda i: chat(client, questions[i], extra_body=kinds[i % 3]), range(9)))
    alone = [chat(client, questions[i], extra_body=kinds[i % 3]) for i in range(9)]
    assert [r.choices[0].message.content for r in together] == [r.choices[0].message.content for r in alone]
    assert max(r.usage.model_extra["batch_size"] for r in together) > 1


# ---------------------------------------------------------------- the issue's repros (D1-D9)

def test_d1_an_empty_answer_does_not_kill_the_scheduler(server, client, questions):
    body = {"model": MODEL, "prompt": "Q: 2 plus 3? A:", "max_tokens": 32, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        empty = pool.submit(post, server, "/v1/completions", body)
        others = [pool.submit(chat, client, q, extra_body={"sampler_params": {"threshold": 0.3}})
                  for q in questions[:3]]
        assert empty.result().status_code == 200
        assert all(f.result().choices[0].finish_reason in ("stop", "length") for f in others)
    for _ in range(3):
        assert post(server, "/v1/completions", body).status_code == 200
    assert chat(client, questions[0]).choices[0].message.content


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_d2_seeds_outside_64_bits_are_400s(server, client, questions, seed):
    r = post(server, "/v1/chat/completions", {"model": MODEL, "temperature": 0.8, "seed": seed,
                                              "messages": [{"role": "user", "content": questions[0]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    limit = "<= 18446744073709551615" if seed > 0 else ">= -9223372036854775808"
    assert f"must be {limit}" in r.json()["error"]["message"]
    assert chat(client, questions[1], seed=2**64 - 1).choices[0].message.content  # the edge is fine


def test_d3_lone_surrogates_are_400s(server):
    for path, body in (("/v1/completions", b'{"model": "d3ray-tiny", "prompt": "a\\ud800b"}'),
                       ("/v1/chat/completions",
                        b'{"model": "d3ray-tiny", "messages": [{"role": "user", "content": "a\\udfffb"}]}')):
        r = post(server, path, body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_text"


def test_d4_deeply_nested_json_is_a_400(server):
    deep = b'{"model": "d3ray-tiny", "prompt": "x", "metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    r = post(server, "/v1/completions", deep)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_d5_a_huge_body_is_refused_fast_and_other_routes_stay_responsive(server):
    huge = json.dumps({"model": MODEL, "prompt": "we have 9 . " * 900_000}).encode()  # ~10 MB
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        started = time.monotonic()
        big = pool.submit(post, server, "/v1/completions", huge)
        time.sleep(0.05)
        t0 = time.monotonic()
        models = httpx.get(f"{server}/v1/models", headers=AUTH, timeout=30)
        models_s = time.monotonic() - t0
        r = big.result()
        big_s = time.monotonic() - started
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert models.status_code == 200 and models_s < 2.0 and big_s < 10.0, (models_s, big_s)
    long_but_legal = json.dumps({"model": MODEL, "prompt": "we have 9 . " * 150_000}).encode()  # 1.8 MB
    t0 = time.monotonic()
    r = post(server, "/v1/completions", long_but_legal, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert time.monotonic() - t0 < 30


def test_d6_probes_do_not_wait_behind_decoding(server, client, questions):
    slow = {"sampler_params": {"threshold": 0.0}}
    probes = []
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        busy = [pool.submit(chat, client, q, extra_body=slow) for q in questions[:12]]
        time.sleep(0.3)
        for _ in range(10):
            for path in ("/health", "/ready"):
                t0 = time.monotonic()
                r = httpx.get(f"{server}{path}", timeout=30)
                probes.append((path, r.status_code, time.monotonic() - t0))
            time.sleep(0.05)
        for f in busy:
            f.result()
    print("probe seconds under load:", [round(t, 3) for _, _, t in probes])
    assert all(code == 200 for _, code, _ in probes), probes
    # The probes read the ingress's own state; the bound is loose because the test's own decoding, Serve's
    # proxy and the replicas share 2 cores (benchmarks/serve_load.py --overload measures it).
    assert max(t for _, _, t in probes) < 1.0, probes


def test_d7_metrics_on_the_http_port_count_every_route_and_status(server, client, questions):
    chat(client, questions[0])
    httpx.get(f"{server}/no/such/route", headers=AUTH, timeout=30)
    post(server, "/v1/completions", b"{broken")
    text = httpx.get(f"{server}/metrics", timeout=30).text
    assert 'd3ray_http_requests_total{method="POST",route="/v1/chat/completions",status_code="200"}' in text
    assert 'route="/v1/completions",status_code="400"' in text
    assert 'route="unmatched",status_code="404"' in text
    assert 'route="/v1/models",status_code="401"' in text or 'status_code="401"' in text
    for name in ("d3ray_completion_tokens_total", "d3ray_request_nfe_bucket", "d3ray_request_tpf_bucket",
                 "d3ray_request_token_forwards_per_token_bucket", "d3ray_http_request_duration_seconds_bucket",
                 "d3ray_http_inflight_requests"):
        assert name in text, name


def test_d8_openapi_documents_bodies_and_errors(server):
    schema = httpx.get(f"{server}/openapi.json", timeout=30).json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        op = schema["paths"][path]["post"]
        assert op["requestBody"]["required"]
        assert {"400", "401", "404", "408", "413", "429", "503"} <= set(op["responses"])
    assert "422" not in json.dumps(schema)
    assert "CompletionRequest" in schema["components"]["schemas"]


def test_d9_max_tokens_up_to_the_limit_fit(server, client):
    for max_tokens in (96, 112):
        r = client.completions.create(model=MODEL, prompt="we have 9 .", max_tokens=max_tokens, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length")
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "we have 9 .", "max_tokens": 113})
    assert r.status_code == 400 and "limit 112" in r.json()["error"]["message"]


# ---------------------------------------------------------------- API breadth and errors

@pytest.mark.parametrize("body,status,param", [
    (b'{"model": "d3ray-tiny", "prompt": ', 400, None),
    (b'{"model": "gpt-4", "prompt": "hi"}', 404, "model"),
    (b'{"model": "d3ray-tiny", "prompt": ""}', 400, "prompt"),
    (json.dumps({"model": MODEL, "prompt": "we have 9 . " * 40}).encode(), 400, "prompt"),
    (b'{"model": "d3ray-tiny", "prompt": "hi", "temperature": "warm"}', 400, "temperature"),
    (b'{"model": "d3ray-tiny", "prompt": "hi", "sampler_params": {"threshold": -1}}', 400,
     "sampler_params.threshold"),
    (b'{"model": "d3ray-tiny", "prompt": "hi", "max_tokens": 100000}', 400, "max_tokens"),
    (b'{"model": "d3ray-tiny", "prompt": "hi", "top_p": 0.5}', 400, "top_p"),
    (b'{"model": "d3ray-tiny", "prompt": "hi", "logprobs": 3}', 400, "logprobs"),
    (b'{"model": "d3ray-tiny", "prompt": "hi", "n": 99}', 400, "n"),
    (b'{"model": "d3ray-tiny", "prompt": [], "max_tokens": 4}', 400, "prompt"),
])
def test_bad_requests_get_openai_error_bodies(server, body, status, param):
    r = post(server, "/v1/completions", body)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]


def test_unknown_fields_are_ignored_and_known_unsupported_ones_refused(server, client, questions):
    ok = chat(client, questions[0], extra_body={"top_k": 5, "metadata": {"a": "b"}, "frobnicate": 1},
              response_format={"type": "text"}, user="u1")
    assert ok.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, questions[0], response_format={"type": "json_object"})
    assert e.value.body["param"] == "response_format"
    dev = client.chat.completions.create(model=MODEL, temperature=0, messages=[
        {"role": "developer", "content": "be brief"}, {"role": "user", "content": questions[0]}])
    assert dev.choices[0].finish_reason in ("stop", "length")


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"sampler_params": {"threshold": "high"}})
    assert e.value.body["param"] == "sampler_params.threshold"
    with pytest.raises(openai.BadRequestError):  # a streaming request fails before the stream starts
        client.chat.completions.create(model=MODEL, messages=[{"role": "bot", "content": "hi"}], stream=True)


def test_overload_is_answered_within_a_second_and_nothing_hangs(server, questions):
    slow = {"model": MODEL, "temperature": 0, "sampler_params": {"threshold": 0.0},
            "messages": [{"role": "user", "content": questions[0]}]}
    results = []

    def one(_):
        t0 = time.monotonic()
        r = post(server, "/v1/chat/completions", slow, timeout=TIMEOUT_S + 15)
        results.append((r.status_code, time.monotonic() - t0, r.headers.get("retry-after")))

    with concurrent.futures.ThreadPoolExecutor(60) as pool:
        list(pool.map(one, range(60)))
    codes = [c for c, _, _ in results]
    assert len(results) == 60 and set(codes) <= {200, 429}, codes
    refused = [(s, ra) for c, s, ra in results if c == 429]
    assert refused, "60 concurrent slow requests should overflow 2 replicas x (8 rows + 4 queued)"
    print(f"overload: {len(refused)} of 60 refused, slowest refusal {max(s for s, _ in refused):.2f} s")
    # benchmarks/serve_load.py measures the refusal latency on a quiet machine (target < 1 s); here the
    # machine is shared with the test process, so the bound is looser.
    assert max(s for s, _ in refused) < 5.0 and all(ra is not None for _, ra in refused)
    # every reserved decoder row came back: the next request is served, not refused
    assert post(server, "/v1/chat/completions", {**slow, "sampler_params": {"threshold": 0.5}},
                timeout=TIMEOUT_S).status_code == 200


def test_streams_that_end_or_break_give_their_rows_back(server, questions):
    """Streams that finish and streams cut by their client both give back the ingress's row reservation."""
    body = {"model": MODEL, "temperature": 0, "stream": True, "messages": [{"role": "user", "content": questions[1]}]}
    for _ in range(3):
        with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, headers=AUTH, timeout=TIMEOUT_S) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the client goes away after the first event
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, headers=AUTH, timeout=TIMEOUT_S) as r:
        assert r.status_code == 200 and "[DONE]" in "".join(r.iter_lines())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ready = httpx.get(f"{server}/ready", timeout=10).json()
        if ready.get("rows_in_use") == 0:
            break
        time.sleep(0.5)
    assert ready.get("rows_in_use") == 0, ready


# ---------------------------------------------------------------- lm-eval through HTTP

TASK_YAML = """task: d3ray_synthetic_http
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 48
  temperature: 0
filter_list:
  - name: last_number
    filter:
      - function: regex
        regex_pattern: "(-?[0-9]+)[^0-9]*$"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.slow
@pytest.mark.parametrize("model", ["local-completions", "local-chat-completions"])
def test_lm_eval_runs_an_offline_task_against_the_server(server, tmp_path, model):
    import os
    import subprocess
    import sys

    pytest.importorskip("lm_eval", reason="lm-eval is installed by the test extra")
    from d3core.models.shipped import TINY_TEACHER_DIR

    problems = synthetic.generate("test", 12, seed=0)
    data = tmp_path / "synthetic.jsonl"
    data.write_text("".join(json.dumps({"question": p.question, "target": str(p.target)}) + "\n" for p in problems))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "d3ray_synthetic_http.yaml").write_text(TASK_YAML.format(data=data))
    endpoint = "chat/completions" if "chat" in model else "completions"
    args = f"model={MODEL},base_url={server}/v1/{endpoint},num_concurrent=4,max_retries=1"
    if "chat" in model:  # messages go to the server's chat template
        args += ",tokenized_requests=False"
    else:  # lm-eval applies the tokenizer's chat template and sends token ids
        args += f",tokenizer_backend=huggingface,tokenizer={TINY_TEACHER_DIR}"
    out = tmp_path / "out"
    env = dict(os.environ, OPENAI_API_KEY=KEY, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", args, "--tasks", "d3ray_synthetic_http",
           "--include_path", str(tmp_path / "tasks"), "--apply_chat_template", "--output_path", str(out),
           "--log_samples"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["d3ray_synthetic_http"]
    accuracy = results["exact_match,last_number"]
    assert 0.3 <= accuracy <= 1.0, results  # the tiny teacher answers most synthetic problems
    samples = [json.loads(line) for f in out.rglob("samples_*.jsonl") for line in f.read_text().splitlines()]
    assert len(samples) == len(problems)


@pytest.mark.slow
def test_schema_fuzz_finds_no_server_error_or_hang(server):
    """schemathesis against the served OpenAPI schema: no 5xx, no timeout, responses as documented."""
    import subprocess
    import sys

    pytest.importorskip("schemathesis", reason="schemathesis is installed by the test extra")
    cli = "from schemathesis.cli import schemathesis; schemathesis()"
    cmd = [sys.executable, "-c", cli, "run", f"{server}/openapi.json", "-H", f"Authorization: Bearer {KEY}",
           "--checks", "all",
           "--exclude-checks", "positive_data_acceptance", "--max-examples", "40", "--request-timeout", "30",
           "--seed", "1", "--no-color"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]


# ---------------------------------------------------------------- last: it disturbs the app

def _replicas() -> list[str]:
    names = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in names if a["namespace"] == "serve" and "D3LLMModel" in a["name"]
                  and a["name"].startswith("SERVE_REPLICA"))


def _replica_pid(name: str) -> int:
    """The PID of a model replica's worker process, checked to be a Ray worker of this test's cluster."""
    import os

    actor = ray.get_actor(name, namespace="serve")
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read().replace(b"\0", b" ")
    assert b"ray::" in cmdline or b"default_worker.py" in cmdline, cmdline
    return pid


def _wait_for_two_running(name_gone: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status = serve.status().applications[APP].deployments["D3LLMModel"]
        if status.replica_states.get("RUNNING", 0) == 2 and name_gone not in _replicas():
            return
        time.sleep(2)
    raise AssertionError(f"dead replica not replaced: {status}")


@pytest.mark.slow
def test_probes_stay_200_while_a_killed_replica_restarts_beside_a_serving_one(server, client, questions):
    """Issue 33: after SIGKILL of one of 2 replicas, /health and /ready answered 503 for 8-10 s (the controller
    called the deployment UNHEALTHY, RUNNING 1, STARTING 1) while every chat request got a 200."""
    import os
    import signal
    import threading

    replicas = _replicas()
    assert len(replicas) == 2, replicas
    pid = _replica_pid(replicas[0])
    probes = []  # (path, status, seconds, at)
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=5) as http:
            while not stop.is_set():
                for path in ("/health", "/ready"):
                    t0 = time.monotonic()
                    try:
                        code = http.get(f"{server}{path}").status_code
                    except httpx.HTTPError as e:
                        code = type(e).__name__
                    probes.append((path, code, time.monotonic() - t0, time.monotonic()))
                time.sleep(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    time.sleep(1.0)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    answers = []
    while time.monotonic() < killed + 15:  # ~15 s of probes and sequential chat requests after the kill
        try:
            answers.append(chat(client, questions[len(answers) % 16]).choices[0].finish_reason)
        except openai.APIStatusError as e:  # the dead replica's call: a 503, never a hang
            answers.append(e.status_code)
    stop.set()
    poller.join(10)
    after = [p for p in probes if p[3] > killed]
    print(f"probes after the kill: {len(after)}, slowest {max(t for _, _, t, _ in after):.3f} s; "
          f"chats: {len(answers)}, not answered: {[a for a in answers if a not in ('stop', 'length')]}")
    assert len(after) >= 50, len(after)
    assert [p for p in probes if p[1] != 200] == []
    assert answers.count("stop") + answers.count("length") >= len(answers) - 2, answers
    _wait_for_two_running(replicas[0])  # the next test kills one too


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
    assert set(codes) <= {503, 429, "stream-error"}, codes
    assert any(ok for ok, _, t in results if t > killed_at + 1), "no request succeeded after the kill"

    _wait_for_two_running(replicas[0])
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        after = list(pool.map(lambda q: chat(client, q), questions[:8]))
    assert all(r.choices[0].finish_reason == "stop" for r in after)
