"""ServeConfig, request validation and parameter resolution, text streaming, the serve YAMLs (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from d3core.models.shipped import TINY_TEACHER_DIR
from serve_apps import protocol as P
from serve_apps.config import ServeConfig
from serve_apps.openai_app import app_builder
from serve_apps.outputs import ChoiceText
from serve_apps.text import encode_chat, encode_completion_prompt

CONFIG_DIR = Path(__file__).resolve().parents[2] / "serve_apps" / "config"


@pytest.fixture(scope="module")
def cfg():
    return ServeConfig.from_preset("tiny")


def parse(body: dict, chat: bool = False):
    return P.parse_request(json.dumps(body).encode(), P.ChatCompletionRequest if chat else P.CompletionRequest)


# ---------------------------------------------------------------- config

def test_tiny_preset_is_cpu_one_thread_shipped_teacher(cfg):
    assert cfg.model == str(TINY_TEACHER_DIR) and cfg.device == "cpu" and cfg.torch_threads == 1
    opts = cfg.deployment_options()
    assert opts["ray_actor_options"] == {"num_cpus": 1.0} and opts["num_replicas"] == 1


def test_gpu_presets_need_a_model_uri_and_use_gpus():
    with pytest.raises(ValueError, match="ServeConfig.model=''.*pass model="):
        ServeConfig.from_preset("llada-8b", model="")
    assert ServeConfig.from_preset("llada-8b").model == "GSAI-ML/LLaDA-8B-Instruct"  # the recipe's teacher
    cfg = ServeConfig.from_preset("dream-7b", model="/models/dream")
    opts = cfg.deployment_options()
    assert opts["ray_actor_options"]["num_gpus"] == 1.0 and cfg.dtype == "bfloat16"
    assert opts["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in opts


def test_from_args_parses_cli_strings_and_student_uri(tmp_path):
    cfg = ServeConfig.from_args({"preset": "tiny", "model": str(tmp_path), "num_replicas": "2",
                                 "batch_wait_timeout_s": "0.5", "sampler_params": '{"threshold": 0.3}'})
    assert cfg.model == str(tmp_path) and cfg.num_replicas == 2 and cfg.batch_wait_timeout_s == 0.5
    assert cfg.default_params().threshold == 0.3
    auto = ServeConfig.from_args({"autoscaling": {"min_replicas": 1, "max_replicas": 2}})
    assert auto.num_replicas is None and "autoscaling_config" in auto.deployment_options()


@pytest.mark.parametrize("overrides,match", [
    ({"sampler": "nope"}, "ServeConfig.sampler='nope'"),
    ({"sampler": "apd"}, "without a verifier"),
    ({"sampler_params": {"gen_length": 50}}, "block_length=16 does not divide"),
    ({"sampler_params": {"bogus": 1}}, "bogus"),
    ({"max_batch_size": 0}, "max_batch_size=0"),
    ({"num_replicas": 2, "autoscaling": {"max_replicas": 2}}, "exactly one of"),
    ({"request_timeout_s": 0}, "request_timeout_s=0"),
    ({"limits": {"threshold": (2.0, 1.0)}}, "low exceeds high"),
    ({"ingress_max_ongoing_requests": 47}, "ingress_max_ongoing_requests=47: must be an int >= .* 48"),
    ({"ingress_max_queued_requests": 10}, "ingress_max_queued_requests=10: must be an int >= .* 48"),
    ({"batching": "step"}, r"batching='step': must be one of \['continuous', 'request'\]"),
    ({"batching": "legacy"}, r"batching='legacy': must be one of \['continuous', 'request'\]"),
    ({"queue_budget_s": 0}, r"queue_budget_s=0: must be > 0 and below request_timeout_s 60.0 .*; use e.g. 5.0"),
    ({"queue_budget_s": 90.0}, r"queue_budget_s=90.0: must be > 0 and below request_timeout_s"),
    ({"num_replicas": None, "autoscaling": {"max_replicas": 2, "target_ongoing_requests": 40}},
     r"target_ongoing_requests=40: must be <= max_batch_size 16.*use max_batch_size / 2"),
    ({"num_replicas": None, "autoscaling": {"max_replicas": 2, "upscale_delay": 2}},
     r"has keys \['upscale_delay'\] that Ray Serve's AutoscalingConfig lacks"),
    ({"num_replicas": None, "autoscaling": {"max_replicas": 2, "upscale_delay_s": -1}}, "rejected by Ray Serve"),
    ({"num_replicas": None, "autoscaling": {"max_replicas": 2, "look_back_period_s": 0.5}},
     r"look_back_period_s=0.5: must exceed metrics_interval_s 0.5"),
])
def test_bad_config_names_value_rule_and_fix(overrides, match):
    with pytest.raises(ValueError, match=match):
        ServeConfig.from_preset("tiny", **overrides)


@pytest.mark.parametrize("args, match", [
    ({"sampler_params": "{bad json"}, r"sampler_params='\{bad json': must be a mapping; .*sampler_params=\{"),
    ({"autoscaling": "[1, 2]"}, r"autoscaling=\[1, 2\]: must be a mapping or null"),
    ({"limits": "3"}, r"limits=3: must be a mapping"),
])
def test_serve_run_arguments_that_are_no_mapping_are_refused_naming_the_field(args, match):
    with pytest.raises(ValueError, match=match):
        ServeConfig.from_args(args)


def test_the_ingress_takes_every_connection_so_probes_never_queue_in_serves_proxy():
    """Issue 33: with 320 closed-loop clients the surplus waited up to 39 s in Serve's proxy queue (the ingress took
    its rows + 32), and a probe waited behind it; the ingress now takes the connections and answers them itself."""
    from serve_apps.config import INGRESS_HEADROOM

    cfg = ServeConfig.from_preset("tiny", max_batch_size=8, max_queued_requests=4, num_replicas=3)
    assert cfg.row_capacity == 3 * (8 + 4)
    opts = cfg.ingress_options()
    assert opts["max_ongoing_requests"] == 36 + INGRESS_HEADROOM
    assert ServeConfig.from_preset("tiny").ingress_options()["max_ongoing_requests"] >= 320 + 48
    assert opts["max_queued_requests"] == opts["max_ongoing_requests"]
    assert opts["backpressure_config"].status_code == 429 and opts["backpressure_config"].retry_after_s == 1.0
    auto = ServeConfig.from_preset("tiny", num_replicas=None, autoscaling={"min_replicas": 1, "max_replicas": 2})
    assert auto.row_capacity == 2 * (16 + 32)  # sized for the most replicas
    own = ServeConfig.from_args({"ingress_max_ongoing_requests": "200", "ingress_max_queued_requests": "64"})
    assert (own.ingress_options()["max_ongoing_requests"], own.ingress_options()["max_queued_requests"]) == (200, 64)


def test_autoscaling_reports_often_and_targets_half_a_batch_unless_told_otherwise():
    """Issue 33: with Serve's defaults (reports every 10 s, averaged over 30 s) 16 clients did not bring up a second
    replica within 15 s."""
    auto = ServeConfig.from_preset("tiny", autoscaling={"min_replicas": 1, "max_replicas": 2})
    opts = auto.deployment_options()["autoscaling_config"]
    assert opts["metrics_interval_s"] == 0.5 and opts["look_back_period_s"] == 2.0 and opts["upscale_delay_s"] == 2.0
    assert opts["target_ongoing_requests"] == 8  # half of max_batch_size 16
    own = ServeConfig.from_preset("tiny", autoscaling={"max_replicas": 2, "upscale_delay_s": 30,
                                                       "target_ongoing_requests": 16})
    assert own.autoscaling_options()["upscale_delay_s"] == 30 and own.autoscaling_options()["metrics_interval_s"] == 0.5
    assert ServeConfig.from_preset("llada-8b").autoscaling_options()["target_ongoing_requests"] == 16  # batch 32


def test_the_model_deployment_holds_rows_queue_and_probe_room_and_its_router_what_the_ingress_admits():
    cfg = ServeConfig.from_preset("tiny", max_batch_size=8, max_queued_requests=4)
    opts = cfg.deployment_options()
    assert opts["max_ongoing_requests"] == 8 + 4 + 8 and opts["max_queued_requests"] == 8 + 4 + 8
    assert cfg.queue_budget_s == 5.0


def test_unknown_builder_argument_is_rejected():
    with pytest.raises(ValueError, match="unknown serve argument"):
        ServeConfig.from_args({"replicas": "2"})
    with pytest.raises(ValueError, match="'continuous' was replaced by 'batching': write batching=continuous"):
        ServeConfig.from_args({"continuous": "false"})  # the old name of the setting gets its new one
    assert ServeConfig.from_args({"batching": "request"}).batching == "request"


@pytest.mark.parametrize("name", ["tiny.yaml", "llada-8b.yaml", "dream-7b.yaml"])
def test_serve_yaml_builds_a_valid_app(name):
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load((CONFIG_DIR / name).read_text())
    ServeDeploySchema.model_validate(doc)  # what `serve deploy` checks
    assert doc["http_options"]["host"] == "127.0.0.1"
    (app,) = doc["applications"]
    assert app["import_path"] == "serve_apps.openai_app:app_builder"
    cfg = ServeConfig.from_args(app["args"])
    assert cfg.preset == app["args"]["preset"]
    app_builder(app["args"])  # binds the deployments; needs no running Ray


def test_trust_remote_code_is_off_by_default_and_on_in_the_dream_config():
    for name, expected in (("tiny.yaml", False), ("llada-8b.yaml", False), ("dream-7b.yaml", True)):
        (app,) = yaml.safe_load((CONFIG_DIR / name).read_text())["applications"]
        assert ServeConfig.from_args(app["args"]).trust_remote_code is expected, name
    assert ServeConfig.from_args({"trust_remote_code": "true"}).trust_remote_code is True  # serve run key=value
    with pytest.raises(ValueError, match="trust_remote_code='yes'"):
        ServeConfig.from_args({"trust_remote_code": "yes"})


def test_a_remote_code_tokenizer_is_refused_at_build_time_naming_the_serve_arg(tmp_path):
    from official_layout import write_dream_tokenizer

    from d3core.models.tokenizer import RemoteCodeError

    write_dream_tokenizer(tmp_path)
    with pytest.raises(RemoteCodeError, match=r"trust_remote_code: true in the serve config args"):
        app_builder({"preset": "tiny", "tokenizer": str(tmp_path)})
    app_builder({"preset": "tiny", "tokenizer": str(tmp_path), "trust_remote_code": True})  # binds


# ---------------------------------------------------------------- requests

@pytest.mark.parametrize("raw,code,param", [
    (b"{not json", "invalid_json", None),
    (b"[1, 2]", "invalid_json", None),
    (b'{"prompt": "x"}', "missing", "model"),
    (b'{"model": "m", "prompt": "x", "temperature": "hot"}', "float_type", "temperature"),
    (b'{"model": "m", "prompt": "x", "max_tokens": 0}', "greater_than_equal", "max_tokens"),
    (b'{"model": "m", "prompt": "x", "max_tokens": "5"}', "int_type", "max_tokens"),
    (b'{"model": "m", "prompt": "x", "stream": "yes"}', "bool_type", "stream"),
    (b'{"model": "m", "prompt": "x", "n": 0}', "greater_than_equal", "n"),
    (b'{"model": "m", "prompt": "x", "seed": 18446744073709551616}', "less_than_equal", "seed"),
    (b'{"model": "m", "prompt": "x", "seed": -9223372036854775809}', "greater_than_equal", "seed"),
    (b'{"model": "m", "prompt": "a\\ud800b"}', "invalid_text", "prompt"),
    (b'{"model": "m", "prompt": "x", "top_p": 0.3}', "unsupported_value", "top_p"),
    (b'{"model": "m", "prompt": "x", "logprobs": 2}', "unsupported_value", "logprobs"),
    (b'{"model": "m", "prompt": "x", "suffix": "y"}', "unsupported_value", "suffix"),
    (b'{"model": "m", "prompt": "x", "stop": 5}', "string_type", "stop"),
    (b'{"model": "m", "prompt": [[]]}', "string_type", "prompt"),
    (b'{"model": "m", "prompt": [], "max_tokens": 2}', "empty_prompt", "prompt"),
])
def test_malformed_or_mistyped_requests_are_400s(raw, code, param):
    with pytest.raises(P.APIError) as e:
        P.parse_request(raw, P.CompletionRequest)
    assert e.value.status == 400 and e.value.code == code and e.value.param == param
    body = e.value.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]


@pytest.mark.parametrize("seed,limit", [(2**64, "<= 18446744073709551615"), (10**30, "<= 18446744073709551615"),
                                        (-(2**63) - 1, ">= -9223372036854775808")])
def test_a_seed_out_of_range_names_the_exact_integer_limit(seed, limit):
    # pydantic's own message renders 2**64 - 1 as the float 18446744073709552000
    with pytest.raises(P.APIError) as e:
        parse({"model": "m", "prompt": "x", "seed": seed})
    assert e.value.param == "seed" and f"must be {limit} (got {seed})" in e.value.message
    assert "18446744073709552000" not in e.value.message
    assert parse({"model": "m", "prompt": "x", "seed": P.SEED_MAX}).seed == 2**64 - 1 == P.SEED_MAX


def test_chat_messages_are_validated():
    with pytest.raises(P.APIError) as e:
        parse({"model": "m", "messages": []}, chat=True)
    assert e.value.param == "messages"
    with pytest.raises(P.APIError) as e:
        parse({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, chat=True)
    assert e.value.param == "messages.0.role"
    for bad, param in (({"response_format": {"type": "json_schema"}}, "response_format"),
                       ({"top_logprobs": 3}, "top_logprobs"), ({"tools": [{"type": "function"}]}, "tools")):
        with pytest.raises(P.APIError) as e:
            parse({"model": "m", "messages": [{"role": "user", "content": "x"}], **bad}, chat=True)
        assert (e.value.status, e.value.param, e.value.code) == (400, param, "unsupported_value")


def test_unknown_fields_are_ignored_and_logged(caplog):
    caplog.set_level("INFO", logger="serve_apps.protocol")
    req = parse({"model": "m", "prompt": "x", "top_k": 5, "metadata": {"k": "v"}, "frobnicate": [1]})
    assert req.model_extra == {"top_k": 5, "metadata": {"k": "v"}, "frobnicate": [1]}
    assert "ignoring unknown request fields ['frobnicate', 'metadata', 'top_k']" in caplog.text
    chat = parse({"model": "m", "messages": [{"role": "developer", "content": "x"}, {"role": "tool", "content": "y"}],
                  "logprobs": True, "top_logprobs": 0, "stream_options": {"include_usage": True}}, chat=True)
    assert chat.want_logprobs and chat.stream_options.include_usage


def test_deep_nesting_is_a_400_not_a_crash():
    deep = b'{"model": "m", "prompt": "x", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(P.APIError) as e:
        P.parse_request(deep, P.CompletionRequest)
    assert e.value.code == "invalid_json"


def test_resolve_params_applies_overrides_within_limits(cfg):
    params, cap = P.resolve_params(cfg, parse({"model": "m", "prompt": "x", "temperature": 0,
                                               "sampler_params": {"threshold": 0.2, "refresh_interval": 4}}))
    assert params.threshold == 0.2 and params.refresh_interval == 4 and params.temperature == 0.0 and cap is None
    params, cap = P.resolve_params(cfg, parse({"model": "m", "prompt": "x", "max_tokens": 50}))
    assert params.gen_length == 64 and cap == 50  # rounded up to whole blocks, capped afterwards
    params, cap = P.resolve_params(cfg, parse({"model": "m", "prompt": "x", "max_tokens": 10}))
    assert params.gen_length == 48 and cap == 10  # the default canvas: batches with default requests


@pytest.mark.parametrize("extra,param,code", [
    ({"sampler_params": {"threshold": 11.0}}, "sampler_params.threshold", "out_of_range"),
    ({"sampler_params": {"threshold": "high"}}, "sampler_params.threshold", "invalid_type"),
    ({"sampler_params": {"refresh_interval": 2.5}}, "sampler_params.refresh_interval", "invalid_type"),
    ({"sampler_params": {"early_stop": 1}}, "sampler_params.early_stop", "invalid_type"),
    ({"sampler_params": {"block_length": 8}}, "sampler_params.block_length", "unsupported_parameter"),
    ({"sampler_params": {"nope": 1}}, "sampler_params.nope", "unknown_parameter"),
    ({"temperature": 3.0}, "temperature", "out_of_range"),
    ({"max_tokens": 4096}, "max_tokens", "out_of_range"),
])
def test_out_of_range_or_forbidden_overrides_are_400s(cfg, extra, param, code):
    with pytest.raises(P.APIError) as e:
        P.resolve_params(cfg, parse({"model": "m", "prompt": "x", **extra}))
    assert (e.value.status, e.value.param, e.value.code) == (400, param, code)


def test_check_prompt_rejects_empty_long_and_foreign_ids():
    for ids, code in [([], "empty_prompt"), ([7] * 100, "context_length_exceeded"), ([7, 999], "invalid_token")]:
        with pytest.raises(P.APIError) as e:
            P.check_prompt(ids, 48, 128, 163, "prompt")
        assert e.value.code == code and e.value.status == 400
    P.check_prompt([7] * 80, 48, 128, 163, "prompt")


# ---------------------------------------------------------------- text

def test_chat_template_and_completion_prompts(tok):
    msgs = parse({"model": "m", "messages": [{"role": "user", "content": "how many apples"}]}, chat=True).messages
    ids = encode_chat(tok, msgs)
    assert ids[0] == tok.bos_token_id and tok.decode(ids).rstrip().endswith("assistant")
    assert encode_completion_prompt(tok, [5, 6]) == [5, 6]
    texts = parse({"model": "m", "prompt": ["we have 9 .", "add 4"]}).prompts
    assert [encode_completion_prompt(tok, p) for p in texts] == [encode_completion_prompt(tok, "we have 9 ."),
                                                                 encode_completion_prompt(tok, "add 4")]
    assert parse({"model": "m", "prompt": [[5, 6], [7]]}).prompts == [[5, 6], [7]]
    assert parse({"model": "m", "prompt": [5, 6]}).prompts == [[5, 6]]
    with pytest.raises(P.APIError) as e:  # a mixed list is not an OpenAI prompt
        parse({"model": "m", "prompt": ["we have 9 .", [5, 6]]})
    assert e.value.param.startswith("prompt")


def test_choice_text_deltas_are_final_and_concatenate_to_the_text(tok):
    ids = tok("we have 9 . add + 4 = 13 . answer 13", add_special_tokens=False)["input_ids"]
    text = ChoiceText(tok, 0, (), None, want_logprobs=True)
    deltas = [text.update(ids[:i], [-0.5] * i, False, False) for i in range(1, len(ids))]
    last = text.update(ids, [-0.5] * len(ids), True, True)
    sent = "".join(d.text for d in deltas + [last] if d is not None)
    assert sent == tok.decode(ids, skip_special_tokens=True) and text.finish_reason == "stop"
    assert sum(len(d.token_ids) for d in deltas + [last] if d is not None) == len(ids)
    for d in deltas + [last]:
        if d is not None:  # each delta's tokens spell its text, which starts at its offset in the whole text
            assert "".join(d.token_texts) == d.text == sent[d.text_offset: d.text_offset + len(d.text)]
    assert "".join(text.choice(nfe=1).token_texts) == sent


def test_choice_text_stops_at_the_first_stop_string_and_holds_back_partial_matches(tok):
    ids = tok("we have 9 . add + 4 = 13 . answer 13", add_special_tokens=False)["input_ids"]
    text = ChoiceText(tok, 0, ("= 13", "answer"), None, want_logprobs=False)
    sent = ""
    for i in range(1, len(ids) + 1):
        d = text.update(ids[:i], [0.0] * i, i == len(ids), False)
        sent += d.text if d else ""
        assert "= 1" not in sent or text.finish_reason == "stop"  # never streams a stop string's start early
    full = tok.decode(ids, skip_special_tokens=True)
    assert text.finish_reason == "stop" and sent == text.text == full[: full.index("= 13")]
    assert tok.decode(list(text.ids), skip_special_tokens=True).startswith(text.text)
    capped = ChoiceText(tok, 0, (), 3, want_logprobs=False)
    capped.update(ids, [0.0] * len(ids), False, False)
    assert capped.finish_reason == "length" and len(capped.ids) == 3
