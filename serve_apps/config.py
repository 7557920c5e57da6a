"""``ServeConfig``: one typed, validated description of a d3ray OpenAI deployment, and its presets.

A config names the checkpoint (a path, fsspec URI, hub id or ``hf://`` URI of an official-layout
checkpoint; ``trust_remote_code`` lets a tokenizer defined by its own code run), the sampler and its
default parameters, which of those a request may override and within which limits, and how the
model deployment is scaled (replicas or autoscaling, CPUs/GPUs per replica, batching,
backpressure, the queue budget and timeouts). ``ServeConfig.from_args`` builds one from the string ``key=value``
arguments that ``serve run module:app_builder key=value`` passes (or the typed ``args`` of a
serve config YAML).

The presets (``tiny``, ``llada-8b``, ``dream-7b``: :func:`preset_config`) live here, with the
config they fill in; the recipes of ``pipelines/recipes.py`` take their serve settings from them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

from pydantic import ValidationError
from ray.serve.config import AutoscalingConfig, BackpressureConfig

from d3core.models import dream, llada
from d3core.models.shipped import TINY_TEACHER_DIR
from d3core.samplers import SAMPLERS
from serve_apps.batching import BATCHING

# A key and value to show in the fix of a mapping field given as something else.
FIELD_EXAMPLES = {"sampler_params": ("threshold", "0.5"), "limits": ("temperature", "[0, 2]"),
                  "resources": ("worker", "1"), "autoscaling": ("max_replicas", "4")}
# Parameters a request may override, with their inclusive [low, high] bounds (None: unbounded).
DEFAULT_LIMITS: dict[str, tuple[float | None, float | None]] = {
    "temperature": (0.0, 2.0),
    "threshold": (0.0, 10.0),
    "block_add_threshold": (0.0, 1.0),
    "decoded_token_threshold": (0.0, 1.0),
    "refresh_interval": (1, 64),
}

# Sampler defaults for serving: d3llm with its delayed prefix cache on (d3LLM's chat demo uses delay 2).
DEFAULT_SAMPLER_PARAMS: dict[str, Any] = {"gen_length": 48, "block_length": 16, "threshold": 0.5,
                                          "cache_delay_iter": 2}

DEVICES = ("cpu", "cuda")
# Ingress calls beyond the engines' rows: probes, metrics, models and quick refusals. Large, so that Serve's
# proxy hands every connection to the ingress at once (which answers or refuses it in milliseconds) instead
# of holding it, and a probe behind it, in its own queue.
INGRESS_HEADROOM = 1024
DTYPES = ("float32", "bfloat16", "float16")
# Autoscaling settings used where a config's ``autoscaling`` leaves them out. Serve's own defaults push
# metrics every 10 s and average over 30 s, so a load beyond one replica added another only after
# 25-30 s; these react within seconds (measured in docs/serving.md). ``metrics_interval_s`` is marked
# deprecated in Ray 2.60 but is still what sets how often handles and replicas report.
AUTOSCALING_DEFAULTS: dict[str, Any] = {"metrics_interval_s": 0.5, "look_back_period_s": 2.0,
                                        "upscale_delay_s": 2.0, "downscale_delay_s": 60.0}


@dataclass(frozen=True)
class ServeConfig:
    """Everything that defines a served model; every field is checked on construction."""

    model: str  # the checkpoint served: path, fsspec URI, hub id or hf:// URI (HF layout)
    model_name: str  # the name clients ask for (/v1/models)
    preset: str = "custom"  # the recipe these settings came from
    tokenizer: str | None = None  # None: the checkpoint directory holds the tokenizer
    trust_remote_code: bool = False  # run the tokenizer's own Python code (Dream's tokenization_dream.py)
    sampler: str = "d3llm"  # the dLLM decoder (d3core.samplers)
    sampler_params: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_SAMPLER_PARAMS))  # its defaults
    # overridable params, [low, high]
    limits: Mapping[str, tuple[float | None, float | None]] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    max_gen_length: int = 112  # the longest generation a request may ask for
    max_model_len: int | None = None  # slots per decoder row (prompt + canvas); None: the model's context
    device: str = "cpu"  # cpu or cuda
    dtype: str = "float32"  # weights dtype on the replica
    torch_threads: int | None = 1  # torch threads per replica (None: torch's default)
    num_cpus: float = 1.0  # CPUs per model replica
    num_gpus: float = 0.0  # GPUs per model replica
    # custom Ray resources per model replica, e.g. {"worker": 1}: replicas run only on nodes that declare them
    resources: dict[str, float] = field(default_factory=dict)
    ingress_num_cpus: float = 0.0  # CPUs of the FastAPI ingress
    # HTTP requests the ingress holds at once; None: every replica's rows and queue + INGRESS_HEADROOM (1024)
    ingress_max_ongoing_requests: int | None = None
    # requests that wait in Serve's proxy for the ingress; beyond both, the proxy itself answers 429.
    # None: as many as the ingress holds (a burst's requests all wait there until assigned)
    ingress_max_queued_requests: int | None = None
    num_replicas: int | None = 1  # fixed replicas (None: autoscaling)
    autoscaling: Mapping[str, Any] | None = None  # Ray Serve autoscaling_config (with num_replicas=None)
    max_ongoing_requests: int | None = None  # Serve's per-replica limit; None: max_batch_size + max_queued + 8
    max_queued_requests: int = 32  # a replica's admission queue; beyond it requests get a 429 at once
    max_batch_size: int = 16  # rows decoded together
    # the longest a request waits for a decoder row (in any queue, before its first step); beyond it a 429
    queue_budget_s: float = 5.0
    batch_wait_timeout_s: float = 0.01  # how long an idle engine waits for a batch to fill
    # "continuous": rows join and leave at every step; "request": a batch decodes to the end before the next
    # forms (a benchmark baseline)
    batching: str = "continuous"
    request_timeout_s: float = 60.0  # a request that takes longer fails
    max_request_bytes: int = 2 * 2**20  # larger bodies get a 413
    api_key: str | None = None  # require "Authorization: Bearer <key>" on /v1 routes (or env D3RAY_API_KEY)
    health_check_period_s: float = 10.0  # seconds between Ray Serve health checks of a replica
    health_check_timeout_s: float = 30.0  # a health check slower than this fails the replica

    def __post_init__(self) -> None:
        def fail(name: str, value: Any, rule: str, fix: str) -> None:
            raise ValueError(f"ServeConfig.{name}={value!r}: {rule}; {fix}")

        for name in ("sampler_params", "limits", "resources", "autoscaling"):
            value = getattr(self, name)
            if not isinstance(value, Mapping) and not (name == "autoscaling" and value is None):
                fail(name, value, "must be a mapping" + (" or null" if name == "autoscaling" else ""),
                     f'write it as a JSON object, e.g. {name}={{"{FIELD_EXAMPLES[name][0]}": {FIELD_EXAMPLES[name][1]}}}')
        if not isinstance(self.model, str) or not self.model:
            fail("model", self.model, "must be a non-empty checkpoint URI (local path or fsspec URI, HF layout)",
                 f"pass model=/path/to/checkpoint (preset {self.preset!r} ships no weights)")
        if not isinstance(self.trust_remote_code, bool):
            fail("trust_remote_code", self.trust_remote_code, "must be true or false",
                 "write trust_remote_code: true (YAML) or trust_remote_code=true (serve run)")
        if not isinstance(self.model_name, str) or not self.model_name.strip():
            fail("model_name", self.model_name, "must be a non-empty name", "pass model_name=<served name>")
        spec = SAMPLERS.get(self.sampler)
        if spec is None or spec.autoregressive or spec.needs_verifier:
            usable = sorted(k for k, s in SAMPLERS.items() if not (s.autoregressive or s.needs_verifier))
            fail("sampler", self.sampler, "must name a registered dLLM sampler without a verifier",
                 f"choose one of {usable}")
        params_cls = SAMPLERS[self.sampler].params_cls
        known = {f.name for f in dataclasses.fields(params_cls)}
        unknown = sorted(set(self.sampler_params) - known)
        if unknown:
            fail("sampler_params", dict(self.sampler_params), f"has keys {unknown} that {params_cls.__name__} lacks",
                 f"use only {sorted(known)}")
        try:
            defaults = params_cls(**self.sampler_params)
        except (TypeError, ValueError) as e:
            fail("sampler_params", dict(self.sampler_params), f"rejected by {params_cls.__name__} ({e})",
                 "fix the named parameter")
        for name, bounds in self.limits.items():
            if name not in known:
                fail("limits", name, f"is not a {params_cls.__name__} field", f"use only {sorted(known)}")
            if not (isinstance(bounds, (tuple, list)) and len(bounds) == 2):
                fail(f"limits[{name!r}]", bounds, "must be a (low, high) pair", "use e.g. [0.0, 1.0]")
            low, high = bounds
            if low is not None and high is not None and low > high:
                fail(f"limits[{name!r}]", bounds, "low exceeds high", "swap the bounds")
        if not isinstance(self.max_gen_length, int) or self.max_gen_length < defaults.gen_length:
            fail("max_gen_length", self.max_gen_length,
                 f"must be an int >= the default gen_length {defaults.gen_length}", "raise it")
        if self.device not in DEVICES:
            fail("device", self.device, f"must be one of {DEVICES}", "pick one")
        if self.dtype not in DTYPES:
            fail("dtype", self.dtype, f"must be one of {DTYPES}", "pick one")
        if self.torch_threads is not None and (not isinstance(self.torch_threads, int) or self.torch_threads < 1):
            fail("torch_threads", self.torch_threads, "must be a positive int or None", "use e.g. 1")
        for name in ("num_cpus", "num_gpus", "ingress_num_cpus"):
            if getattr(self, name) < 0:
                fail(name, getattr(self, name), "must be >= 0", "use 0 or more")
        self._check_resources(fail)
        if self.device == "cuda" and self.num_gpus <= 0:
            fail("num_gpus", self.num_gpus, "must be > 0 when device='cuda'", "set num_gpus=1")
        if (self.num_replicas is None) == (self.autoscaling is None):
            fail("num_replicas", self.num_replicas, "exactly one of num_replicas and autoscaling must be set",
                 "set num_replicas=N, or num_replicas=None with an autoscaling dict")
        if self.num_replicas is not None and (not isinstance(self.num_replicas, int) or self.num_replicas < 1):
            fail("num_replicas", self.num_replicas, "must be a positive int", "use e.g. 1")
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            fail("max_batch_size", self.max_batch_size, "must be a positive int", "use e.g. 16")
        if not isinstance(self.max_queued_requests, int) or self.max_queued_requests < 1:
            fail("max_queued_requests", self.max_queued_requests, "must be a positive int (the admission queue "
                 "of a replica; beyond it a request gets 429 at once)", "use e.g. 32")
        if self.autoscaling is not None:
            self._check_autoscaling(fail)
        if self.batch_wait_timeout_s < 0:
            fail("batch_wait_timeout_s", self.batch_wait_timeout_s, "must be >= 0", "use e.g. 0.01")
        if self.max_ongoing_requests is not None and (not isinstance(self.max_ongoing_requests, int)
                                                      or self.max_ongoing_requests < self.max_batch_size):
            fail("max_ongoing_requests", self.max_ongoing_requests, f"must be an int >= max_batch_size "
                 f"{self.max_batch_size} (a replica must accept a full batch)", "raise it, or None to derive it")
        proxy_bounds = {"ingress_max_ongoing_requests": "else Serve's proxy refuses requests the engines could take",
                        "ingress_max_queued_requests": "a burst's requests all wait in Serve's proxy until it "
                                                       "assigns them, so a smaller queue refuses requests the engines "
                                                       "could take"}
        for name, why in proxy_bounds.items():
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < self.row_capacity):
                fail(name, value, f"must be an int >= the replicas' rows and queues, {self.row_capacity} ({why})",
                     "raise it, or None to derive it")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int)
                                               or self.max_model_len <= self.max_gen_length):
            fail("max_model_len", self.max_model_len, f"must be an int > max_gen_length {self.max_gen_length}",
                 "leave room for the prompt, or use None for the model's context")
        if self.batching not in BATCHING:
            fail("batching", self.batching, f"must be one of {list(BATCHING)}",
                 "write batching: continuous (request is a benchmark baseline; the app's batching from before the "
                 "step engine is benchmarks/legacy_engine.py)")
        if not isinstance(self.max_request_bytes, int) or self.max_request_bytes < 1024:
            fail("max_request_bytes", self.max_request_bytes, "must be an int >= 1024", "use e.g. 2097152")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            fail("api_key", "<hidden>", "must be a non-empty string or None", "set a key or leave it unset")
        for name in ("request_timeout_s", "health_check_period_s", "health_check_timeout_s"):
            if getattr(self, name) <= 0:
                fail(name, getattr(self, name), "must be > 0 seconds", "use a positive number")
        if not isinstance(self.queue_budget_s, (int, float)) or not 0 < self.queue_budget_s < self.request_timeout_s:
            fail("queue_budget_s", self.queue_budget_s, f"must be > 0 and below request_timeout_s "
                 f"{self.request_timeout_s} (a request that waits its whole timeout is never decoded)",
                 "use e.g. 5.0")

    def _check_resources(self, fail) -> None:
        """Custom resources only (CPU and GPU have their own fields), amounts Ray accepts."""
        for name, amount in self.resources.items():
            if not isinstance(name, str) or not name.strip() or name in ("CPU", "GPU", "memory", "object_store_memory"):
                fail("resources", dict(self.resources), f"{name!r} is no custom resource name",
                     "set CPUs and GPUs with num_cpus / num_gpus and name custom resources only here")
            number = isinstance(amount, (int, float)) and not isinstance(amount, bool)
            if not number or not math.isfinite(amount) or amount <= 0 or (amount > 1 and amount != int(amount)):
                fail(f"resources[{name!r}]", amount, "must be a number > 0, whole above 1 (Ray takes fractions of a "
                     "resource only up to 1)", "use e.g. 1, 0.5 or 2")

    def _check_autoscaling(self, fail) -> None:
        lo, hi = self.autoscaling.get("min_replicas", 1), self.autoscaling.get("max_replicas", 1)
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi and hi >= 1):
            fail("autoscaling", dict(self.autoscaling), "needs ints 0 <= min_replicas <= max_replicas, max >= 1",
                 "fix the replica bounds")
        unknown = sorted(set(self.autoscaling) - set(AutoscalingConfig.model_fields))
        if unknown:
            fail("autoscaling", dict(self.autoscaling), f"has keys {unknown} that Ray Serve's AutoscalingConfig "
                 "lacks", f"use only {sorted(AutoscalingConfig.model_fields)}")
        options = self.autoscaling_options()
        try:
            with warnings.catch_warnings():  # metrics_interval_s: see AUTOSCALING_DEFAULTS
                warnings.simplefilter("ignore", DeprecationWarning)
                AutoscalingConfig(**options)
        except ValidationError as e:
            fail("autoscaling", options, f"rejected by Ray Serve ({e.errors()[0]['msg']})", "fix the named setting")
        target = options["target_ongoing_requests"]
        if not target <= self.max_batch_size:
            fail("autoscaling.target_ongoing_requests", target, f"must be <= max_batch_size {self.max_batch_size}: "
                 "a replica batches its calls, so more than a full batch per replica means requests queue, and above "
                 "its rows and queue a replica never gets enough calls to ask for another", "use max_batch_size / 2")
        if options["look_back_period_s"] <= options["metrics_interval_s"]:
            fail("autoscaling.look_back_period_s", options["look_back_period_s"],
                 f"must exceed metrics_interval_s {options['metrics_interval_s']} (the window averages its reports)",
                 "use e.g. 4 x metrics_interval_s")

    @property
    def tokenizer_uri(self) -> str:
        return self.tokenizer or self.model

    def default_params(self):
        return SAMPLERS[self.sampler].params_cls(**self.sampler_params)

    def __repr__(self) -> str:  # never log the API key
        fields = ", ".join(f"{f.name}={'<hidden>' if f.name == 'api_key' and self.api_key else getattr(self, f.name)!r}"
                           for f in dataclasses.fields(self))
        return f"ServeConfig({fields})"

    def autoscaling_options(self) -> dict[str, Any]:
        """The model deployment's ``autoscaling_config``: the config's keys over AUTOSCALING_DEFAULTS, with
        ``target_ongoing_requests`` half a batch by default (a replica's ongoing calls are its decoding rows
        and its queue, so a replica at half its rows asks for another before any request queues)."""
        defaults = {**AUTOSCALING_DEFAULTS, "target_ongoing_requests": max(1, self.max_batch_size // 2)}
        return {**defaults, **dict(self.autoscaling or {})}

    @property
    def max_replicas(self) -> int:
        return self.num_replicas if self.num_replicas is not None else int(self.autoscaling.get("max_replicas", 1))

    @property
    def row_capacity(self) -> int:
        """Decoder rows and queue places of all replicas (at the most replicas): what the ingress admits."""
        return self.max_replicas * (self.max_batch_size + self.max_queued_requests)

    @property
    def replica_ongoing(self) -> int:
        """Calls a replica takes at once: its rows, its admission queue, and room for quick refusals."""
        return self.max_ongoing_requests or self.max_batch_size + self.max_queued_requests + 8

    def deployment_options(self) -> dict[str, Any]:
        """Ray Serve options of the model deployment.

        A replica accepts more calls than it decodes (its rows, its queue of ``max_queued_requests``
        and 8 more for probes), so that the replica, not Serve's router, decides what waits: a call
        waits there for a row only until its queue budget runs out (``RowGate``). Every call waits in
        the router's queue until the router assigns it, so that queue takes as many as the ingress
        admits at once (``row_capacity``, + 8 for probes): a smaller one refused calls of a burst that
        the replicas had room for. A call that reaches a replica past its budget gets a 429 there.
        """
        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            actor["num_gpus"] = self.num_gpus
        if self.resources:
            actor["resources"] = dict(self.resources)
        opts: dict[str, Any] = {
            "ray_actor_options": actor,
            "max_ongoing_requests": self.replica_ongoing,
            "max_queued_requests": self.row_capacity + 8,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
        }
        if self.autoscaling is not None:
            opts["autoscaling_config"] = self.autoscaling_options()
        else:
            opts["num_replicas"] = self.num_replicas
        return opts

    def ingress_options(self) -> dict[str, Any]:
        """Ray Serve options of the ingress deployment.

        The ingress answers or refuses a request in milliseconds (``serve_apps.admission``), and its
        probes answer from its own state (``serve_apps.health``). So it takes every connection at
        once: its rows and queues plus ``INGRESS_HEADROOM``. A request Serve's proxy holds in its own
        queue waits there behind the others, probes included, for as long as the ingress is full, so
        that queue is for bursts beyond the headroom only, and the proxy refuses the rest itself with
        429 + ``Retry-After``.
        """
        ongoing = self.ingress_max_ongoing_requests or self.row_capacity + INGRESS_HEADROOM
        return {"ray_actor_options": {"num_cpus": self.ingress_num_cpus},
                "max_ongoing_requests": ongoing,
                "max_queued_requests": self.ingress_max_queued_requests or ongoing,
                "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=1.0)}

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> "ServeConfig":
        """The preset's settings (:func:`preset_config`) with ``overrides``."""
        base = dataclasses.asdict(preset_config(preset))
        if "autoscaling" in overrides and overrides["autoscaling"] is not None and "num_replicas" not in overrides:
            base["num_replicas"] = None
        base.update(overrides, preset=preset)
        return cls(**base)

    @classmethod
    def from_args(cls, args: Mapping[str, Any] | None) -> "ServeConfig":
        """Build from builder args: ``preset`` (default ``tiny``) plus field overrides.

        String values (as ``serve run ... key=value`` passes them) are parsed as JSON when they
        look like JSON (numbers, booleans, null, objects, lists), else kept as strings.
        """
        args = dict(args or {})
        preset = str(args.pop("preset", "tiny"))
        names = {f.name for f in dataclasses.fields(cls)} - {"preset"}
        unknown = sorted(set(args) - names)
        if "continuous" in unknown:
            raise ValueError("serve argument 'continuous' was replaced by 'batching': write batching=continuous "
                             "(continuous: true) or batching=request (continuous: false)")
        if unknown:
            raise ValueError(f"unknown serve argument(s) {unknown}: valid keys are preset and {sorted(names)}")
        return cls.from_preset(preset, **{k: _parse_arg(v) for k, v in args.items()})


def _parse_arg(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() in ("none", "null"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return value


# -- presets ----------------------------------------------------------------------------------------
def _tiny() -> ServeConfig:
    """The shipped ~1M-parameter teacher on CPU, one torch thread per replica."""
    return ServeConfig(model=str(TINY_TEACHER_DIR), model_name="d3ray-tiny", preset="tiny")


def _llada_8b() -> ServeConfig:
    """LLaDA-8B-Instruct on GPUs: bf16 replicas, autoscaling 1-4, d3LLM's 256 new tokens in blocks of 32."""
    return ServeConfig(model=llada.OFFICIAL_REPO, model_name="d3ray-llada-8b", preset="llada-8b", device="cuda",
                       dtype="bfloat16", torch_threads=None, num_cpus=4.0, num_gpus=1.0, ingress_num_cpus=1.0,
                       num_replicas=None,
                       autoscaling={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16},
                       sampler_params={"gen_length": 256, "block_length": 32, "threshold": 0.5, "cache_delay_iter": 2,
                                       "refresh_interval": 32},
                       max_gen_length=1024, max_model_len=2048, max_queued_requests=64, max_batch_size=32,
                       request_timeout_s=300.0)


def _dream_7b() -> ServeConfig:
    """Dream-v0-Instruct-7B: the llada-8b settings with Dream's checkpoint."""
    return dataclasses.replace(_llada_8b(), model=dream.OFFICIAL_REPO, model_name="d3ray-dream-7b", preset="dream-7b")


_PRESETS = {"tiny": _tiny, "llada-8b": _llada_8b, "dream-7b": _dream_7b}
PRESETS = tuple(_PRESETS)


def preset_config(preset: str) -> ServeConfig:
    """The serve settings of ``preset`` (also the serve part of the recipe of that name, ``pipelines/recipes.py``)."""
    if preset not in _PRESETS:
        raise ValueError(f"preset={preset!r} is unknown: choose one of {list(PRESETS)}")
    return _PRESETS[preset]()
