"""How :class:`~pipelines.evaluate.EvaluateConfig` is written on a command line or in a config file.

- ``models``: ``NAME=URI`` items (``--model teacher=A --model student=B``);
- ``sweeps``: ``SAMPLER.AXIS=V1,V2`` items, ``vanilla`` with no values (``;`` also separates
  items); a bare ``SAMPLER=...`` names that sampler's one axis;
- ``sampler_params``: ``SAMPLER.FIELD=VALUE`` items (JSON values, bare strings allowed), applied
  over the recipe's params (a sampler's other params stay).

Repeating one of these flags adds to it (``pipelines._cli.merge_repeated``).
"""

from __future__ import annotations

import dataclasses
import json
import logging

from pipelines.evaluate import EvaluateConfig
from pipelines.sweeps import DLLM_SAMPLERS, SHAPE_FIELDS, SWEEP_AXES, split_sweep_key, sweep_key

logger = logging.getLogger("d3ray.evaluate")


def _pairs_to_dict(items) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, uri = str(item).partition("=")
        if not sep or not name:
            raise ValueError(f"--model {item!r}: expected NAME=URI (e.g. student=runs/full/student)")
        out[name] = uri
    return out


def parse_sweeps(items) -> dict[str, tuple[float, ...]]:
    """``SAMPLER.AXIS=V1,V2`` items (``;`` also separates them) into ``sweeps``; ``vanilla`` takes no values.

    A bare ``SAMPLER=...`` names that sampler's one axis (``d3llm=0.3`` is ``d3llm.entropy_threshold=0.3``);
    the config, the saved recipe and the reports always carry the full name.
    """
    out: dict[str, tuple[float, ...]] = {}
    for item in [p for part in items for p in str(part).split(";") if p.strip()]:
        key, _, values = item.partition("=")
        key = key.strip()
        if key in SWEEP_AXES:
            key = sweep_key(key)
        split_sweep_key(key)
        try:
            out[key] = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError as err:
            raise ValueError(f"sweep {item!r}: {err}; write e.g. d3llm.entropy_threshold=0.3,0.5 vanilla") from err
    return out


def sweeps_to_items(sweeps) -> tuple[str, ...]:
    return tuple(k if not v else f"{k}={','.join(f'{x:g}' for x in v)}" for k, v in sweeps.items())


def parse_sampler_params(items) -> dict[str, dict]:
    """``SAMPLER.FIELD=JSON`` items, e.g. ``d3llm.cache_delay_iter=1`` ``fast_dllm.cache="prefix"``."""
    out: dict[str, dict] = {}
    for item in items:
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


def _params_to_items(params) -> tuple[str, ...]:
    return tuple(f"{s}.{k}={json.dumps(v) if not isinstance(v, str) else v}" for s, d in params.items()
                 for k, v in d.items())


def merged_params(base: dict[str, dict], items) -> dict[str, dict]:
    """``--param`` items over the recipe's sampler params (a sampler's other params stay as they were)."""
    out = {k: dict(v) for k, v in base.items()}
    for sampler, params in parse_sampler_params(items).items():
        out.setdefault(sampler, {}).update(params)
    return out


def cli_spec(base: EvaluateConfig, hidden=frozenset(), aliases=None):
    """How EvaluateConfig appears on a command line (evaluate.py, and full.py's --evaluate.* group)."""
    from pipelines import _cli

    from d3core.samplers import get_sampler

    seq = tuple[str, ...]
    settable = "; ".join(
        f"{s}: " + ", ".join(f.name for f in dataclasses.fields(get_sampler(s).params_cls)
                             if f.name not in (*SHAPE_FIELDS, "threshold"))
        for s in DLLM_SAMPLERS)
    helps = {"sampler_params": f"SAMPLER.FIELD=VALUE: fixed params of a sampler's cells, over the recipe's (the "
                               f"cache included); the fields: {settable}",
             "sweeps": "SAMPLER.AXIS=V1,V2 ... (vanilla: no values): fast_dllm.confidence_threshold in (0, 1] "
                       "(higher: stricter), dparallel.entropy_threshold / d3llm.entropy_threshold in nats "
                       "(lower: stricter); SAMPLER=V1,V2 names that sampler's one axis",
             "models": "NAME=URI ...: the dLLMs evaluated (paths, fsspec URIs, hub ids)"}
    return _cli.ViewSpec(EvaluateConfig, hidden=frozenset(hidden), aliases=aliases or {}, helps=helps, transforms={
        "models": _cli.Transform(seq, lambda d: tuple(f"{k}={v}" for k, v in d.items()), _pairs_to_dict),
        "sweeps": _cli.Transform(seq, sweeps_to_items, parse_sweeps),
        "sampler_params": _cli.Transform(seq, _params_to_items,
                                         lambda items: merged_params(base.sampler_params, items)),
        "ar_model": _cli.optional_text(),
    })
