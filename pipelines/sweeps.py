"""The samplers of an evaluation: sweep axes and fixed params, parsed once; sweep points, built once.

``fast_dllm`` commits tokens whose probability is at least a *confidence* (higher: stricter, fewer
tokens per step); ``dparallel`` and ``d3llm`` commit tokens whose *entropy* (nats) is at most a
threshold (lower: stricter). The samplers' params classes call both ``threshold``; every config,
command line, saved recipe and report names the axis: ``fast_dllm.confidence_threshold``,
``dparallel.entropy_threshold``, ``d3llm.entropy_threshold``, and ``vanilla`` (no axis).

The way in, each step once:

- the words typed (``--sweeps d3llm.entropy_threshold=0.3,0.5 vanilla``, a bare ``d3llm=0.3``
  naming that sampler's one axis; ``--param d3llm.cache_delay_iter=1``) are read by
  :func:`parse_sweeps` and :func:`parse_sampler_params`, a config file's mappings by
  :func:`sweeps_from_data`, into the typed values of ``EvaluateConfig.sweeps`` and
  ``EvaluateConfig.sampler_params``;
- :func:`sweep_points` builds every :class:`SweepPoint`: the sampler and its params dataclass,
  complete (decode shape, fixed params, the axis value in the params field ``SWEEP_AXES``
  names), on the driver, so a bad value fails before any cluster work;
- each evaluation cell carries its point to the Ray task that decodes with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

DLLM_SAMPLERS = ("vanilla", "fast_dllm", "dparallel", "d3llm")
# What each sampler's sweep varies: its axis (the name every config and report uses) and the field of its
# params class that holds it. fast_dllm commits tokens whose probability is >= a confidence (higher: stricter,
# fewer per step); dparallel and d3llm commit tokens whose entropy is <= a threshold in nats (lower: stricter).
SWEEP_AXES: dict[str, tuple[str, str]] = {
    "fast_dllm": ("confidence_threshold", "threshold"),
    "dparallel": ("entropy_threshold", "threshold"),
    "d3llm": ("entropy_threshold", "threshold"),
}
AXIS_MEANING = {"confidence_threshold": "a probability in (0, 1], higher is stricter",
                "entropy_threshold": "in nats, lower is stricter"}
VANILLA = "vanilla"  # the one-token-per-step reference: a sweep key without an axis
AR = "ar"  # the AR baseline's sampler: not swept
# Fields every sampler shares with the run's decode shape, set by gen_length / block_length only.
SHAPE_FIELDS = ("gen_length", "block_length")
EXAMPLE = "write e.g. d3llm.entropy_threshold=0.3,0.5 vanilla"


def sweep_key(sampler: str) -> str:
    return VANILLA if sampler == VANILLA else f"{sampler}.{SWEEP_AXES[sampler][0]}"


def split_sweep_key(key: str) -> tuple[str, str | None]:
    """``"d3llm.entropy_threshold"`` -> ("d3llm", "entropy_threshold"); refuses an unnamed or unknown axis."""
    if key == VANILLA:
        return VANILLA, None
    sampler, _, axis = key.partition(".")
    if sampler not in SWEEP_AXES:
        raise ValueError(f"sweeps has {key!r}: sweepable samplers are {DLLM_SAMPLERS} (the AR baseline comes from "
                         f"ar_model); write one of {[VANILLA, *map(sweep_key, SWEEP_AXES)]}")
    want = SWEEP_AXES[sampler][0]
    if axis != want:
        raise ValueError(f"sweeps has {key!r}: {sampler} sweeps its {want} ({AXIS_MEANING[want]}); "
                         f"write {sampler}.{want}=...")
    return sampler, axis


def _full_key(key: str) -> str:
    """A bare ``SAMPLER`` names that sampler's one axis; the result is a valid sweep key."""
    key = key.strip()
    key = sweep_key(key) if key in SWEEP_AXES else key
    split_sweep_key(key)
    return key


# -- the words typed, a config file's mappings -> typed values --------------------------------------------
def parse_sweeps(words: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """``SAMPLER.AXIS=V1,V2`` words (``;`` also separates them) into ``sweeps``; ``vanilla`` takes no values."""
    out: dict[str, tuple[float, ...]] = {}
    for item in [p for word in words for p in str(word).split(";") if p.strip()]:
        key, _, values = item.partition("=")
        key = _full_key(key)
        try:
            out[key] = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError as err:
            raise ValueError(f"sweep {item!r}: {err}; {EXAMPLE}") from err
    return out


def sweeps_from_data(data: Mapping[str, Any]) -> dict[str, tuple[float, ...]]:
    """A config file's ``sweeps`` (``SAMPLER.AXIS: [V1, V2]``, ``vanilla: []``) as typed values."""
    if not isinstance(data, Mapping):
        raise ValueError(f"sweeps: expected a mapping of SAMPLER.AXIS to values, got {data!r}")
    out: dict[str, tuple[float, ...]] = {}
    for key, values in data.items():
        key = _full_key(str(key))
        values = [] if values is None else values if isinstance(values, (list, tuple)) else [values]
        try:
            out[key] = tuple(float(v) for v in values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"sweeps[{key!r}]={values!r}: {err}; {EXAMPLE}") from err
    return out


def sweep_words(sweeps: Mapping[str, Sequence[float]]) -> list[str]:
    """``sweeps`` as it would be typed (``--help`` shows the default so)."""
    return [k if not v else f"{k}={','.join(f'{x:g}' for x in v)}" for k, v in sweeps.items()]


def parse_sampler_params(words: Sequence[str], base: Mapping[str, Mapping[str, Any]]) -> dict[str, dict]:
    """``SAMPLER.FIELD=VALUE`` words (JSON values, bare strings allowed) over ``base``: a sampler's other params stay.

    E.g. ``d3llm.cache_delay_iter=1`` ``fast_dllm.cache=prefix``.
    """
    out = {sampler: dict(params) for sampler, params in base.items()}
    for item in words:
        key, sep, value = str(item).partition("=")
        sampler, dot, name = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"sampler param {item!r}: expected SAMPLER.FIELD=VALUE, e.g. d3llm.cache_delay_iter=1")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value  # a bare string (fast_dllm.cache=dual)
        out.setdefault(sampler, {})[name] = parsed
    return out


def sampler_param_words(params: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """``sampler_params`` as it would be typed (``--help`` shows the default so)."""
    return [f"{s}.{k}={v if isinstance(v, str) else json.dumps(v)}" for s, d in params.items() for k, v in d.items()]


# -- typed values -> the params each cell decodes with ------------------------------------------------------
@dataclass(frozen=True)
class SweepPoint:
    """One decoder setting of an evaluation: a sampler and its complete params."""

    sampler: str  # a DLLM_SAMPLERS name, or "ar" for the AR baseline
    value: float | None  # the value of the sampler's sweep axis (SWEEP_AXES); None: vanilla, the AR baseline
    params: Any  # the sampler's params dataclass (d3core.samplers): decode shape, fixed params, the axis value


def sweep_points(sweeps: Mapping[str, Sequence[float]], sampler_params: Mapping[str, Mapping[str, Any]],
                 gen_length: int, block_length: int) -> tuple[SweepPoint, ...]:
    """Every point of ``sweeps``, in order, its params built (and so checked) here: a bad value names its axis."""
    from d3core.samplers import get_sampler

    points = []
    for key, values in sweeps.items():
        sampler, _ = split_sweep_key(key)
        cls = get_sampler(sampler).params_cls
        fixed = {"gen_length": gen_length, "block_length": block_length, **sampler_params.get(sampler, {})}
        for value in values or (None,):
            swept = {} if value is None else {SWEEP_AXES[sampler][1]: value}
            try:
                params = cls(**fixed, **swept)
            except TypeError as err:
                raise ValueError(f"sampler_params[{sampler!r}]={sampler_params.get(sampler)}: {err}; use fields of "
                                 f"{cls.__name__}") from err
            except ValueError as err:
                raise ValueError(f"{key}={value}: {err}" if value is not None else str(err)) from err
            points.append(SweepPoint(sampler, value, params))
    return tuple(points)


def ar_point(gen_length: int) -> SweepPoint:
    """The AR baseline's decoder setting: ``gen_length`` new tokens, greedy."""
    from d3core.samplers.ar import ARParams

    return SweepPoint(AR, None, ARParams(gen_length=gen_length))
