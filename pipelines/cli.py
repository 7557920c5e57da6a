"""The command lines of d3ray: every one generated from the config dataclasses, over the preset's recipe.

    python pipelines/trajectories.py [--preset NAME] [--config FILE.yaml] [--FIELD VALUE ...]
    python pipelines/distill.py ...        python pipelines/evaluate.py ...
    python -m pipelines.cli STAGE ...      (the same commands)
    python pipelines/full.py ...           (the main job: :func:`parse_full`)

This is the one module that reads the recipes for a command line: ``--preset`` picks the recipe
(``pipelines/recipes.py``), ``--config FILE.yaml`` applies values over it, and the flags apply
over both. It parses ``argv`` into the finished, validated config and hands that to the stage
(``trajectories.run``, ``distill.run_distill``, ``evaluate.run_evaluation``; ``full.py`` hands
its ``FullConfig`` to ``full.run`` and the recipe's ``ServeConfig`` to the serve app). The stage
modules import nothing from here: a stage file's ``__main__`` block runs this module.

Built with tyro because it already is the project's CLI library: it generates the flags, their
help text (each field's comment) and their defaults from the dataclasses themselves, and it
supports nested configs (``--trajectories.seed``, ``--distill.lr`` in ``full.py``). How each
class appears on a command line (hidden fields, short aliases, fields typed in another syntax)
is described here, in :class:`pipelines._cli.Spec`, not in the config classes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Any, Sequence

from pipelines import _cli
from pipelines import distill as D
from pipelines import evaluate as E
from pipelines import trajectories as P
from pipelines.recipes import RECIPES, SHARED, STAGE_FIELDS, Recipe, build, get_recipe
from pipelines.sweeps import (
    DLLM_SAMPLERS,
    SHAPE_FIELDS,
    parse_sampler_params,
    parse_sweeps,
    sampler_param_words,
    sweep_words,
    sweeps_from_data,
)
from serve_apps.config import ServeConfig

logger = logging.getLogger("d3ray.cli")

PRESETS = tuple(RECIPES)
DEFAULT_PRESET = "tiny"
# Stage outputs are fields of their configs, so every stage command has --overwrite beside them.
OVERWRITE_HELP = {"trajectories": "clear OUT if it holds trajectories of other settings, then decode",
                  "distill": "clear OUT and the training storage if they hold another run's outputs, then train anew",
                  "evaluate": "clear OUT if it holds another evaluation"}


# -- how each config class appears ------------------------------------------------------------------
def _model_pairs(words: Sequence[str]) -> dict[str, str]:
    out = {}
    for word in words:
        name, sep, uri = str(word).partition("=")
        if not sep or not name:
            raise ValueError(f"--model {word!r}: expected NAME=URI (e.g. student=runs/full/student)")
        out[name] = uri
    return out


def evaluate_spec(hidden: Sequence[str] = (), aliases: dict | None = None) -> _cli.Spec:
    """How EvaluateConfig appears (evaluate.py, and full.py's --evaluate.* group)."""
    from d3core.samplers import get_sampler

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
    return _cli.Spec(hidden=frozenset(hidden), aliases=aliases or {}, helps=helps, syntax={
        "models": _cli.Syntax("NAME=URI", lambda words, _: _model_pairs(words),
                              lambda models: [f"{k}={v}" for k, v in models.items()]),
        "sweeps": _cli.Syntax("SAMPLER.AXIS=V1,V2", lambda words, _: parse_sweeps(words), sweep_words),
        "sampler_params": _cli.Syntax("SAMPLER.FIELD=VALUE", parse_sampler_params, sampler_param_words),
        "ar_model": _cli.optional_text(),
    })


def _epochs_win(values: dict, argv: Sequence[str], prefix: str, steps_aliases: Sequence[str] = ()) -> dict:
    """An explicit ``--epochs`` wins over a ``max_steps`` that came from the preset or a config file.

    ``max_steps`` alone decides the length when set, so ``--epochs 2`` over the tiny preset's 350
    steps would otherwise be ignored; both flags given at once is ambiguous and refused. ``prefix``
    is the flags' (``--distill.`` in full.py).
    """
    epochs, steps = f"{prefix}epochs", f"{prefix}max-steps"
    if not _cli.given(argv, epochs) or values["max_steps"] is None:
        return values
    if any(_cli.given(argv, flag) for flag in (steps, *steps_aliases)):
        raise ValueError(f"{epochs} {values['epochs']} with {steps} {values['max_steps']}: max_steps alone sets the "
                         f"length, so the epochs would be ignored; give {epochs} N for N passes over the rows, or "
                         f"{steps} S for S optimizer steps")
    logger.info("%s %d given: training %d epochs instead of the preset's max_steps=%d", epochs, values["epochs"],
                values["epochs"], values["max_steps"])
    return {**values, "max_steps": None}


def _distill_spec(argv: Sequence[str], prefix: str, **kw: Any) -> _cli.Spec:
    steps_aliases = kw.get("aliases", {}).get("max_steps", ())
    return _cli.Spec(**kw, build=lambda values: D.DistillConfig(**_epochs_win(values, argv, prefix, steps_aliases)))


# -- the stage commands -----------------------------------------------------------------------------
def _stage_args(stage: str, argv: Sequence[str] | None) -> tuple[str, dict, list[str]]:
    """(preset, the config file's values for ``stage``, the other flags)."""
    argv = sys.argv[1:] if argv is None else argv
    preset, data, rest = _cli.pre_parse(argv, PRESETS, DEFAULT_PRESET)
    return preset, _cli.stage_section(data, stage), rest


def _overwrite(stage: str) -> _cli.Flag:
    return _cli.Flag("overwrite", bool, False, OVERWRITE_HELP[stage])


def parse_trajectories(argv: Sequence[str] | None = None) -> tuple[P.TrajectoriesConfig, bool]:
    """(config, overwrite) of ``python pipelines/trajectories.py``, over the preset's recipe."""
    preset, data, rest = _stage_args(P.STAGE, argv)
    default = _cli.apply(get_recipe(preset).trajectories, data, "config")
    cfg, flags = _cli.parse(P.TrajectoriesConfig, default, {P.TrajectoriesConfig: _cli.Spec()}, rest, P.__doc__,
                            (*_cli.preset_flags(preset, PRESETS), _overwrite(P.STAGE)))
    P.require_filesystems(cfg)
    return cfg, flags["overwrite"]


def parse_distill(argv: Sequence[str] | None = None) -> tuple[D.DistillConfig, bool]:
    """(config, overwrite) of ``python pipelines/distill.py``, over the preset's recipe."""
    preset, data, rest = _stage_args(D.STAGE, argv)
    default = _cli.apply(get_recipe(preset).distill, data, "config")
    cfg, flags = _cli.parse(D.DistillConfig, default, {D.DistillConfig: _distill_spec(rest, "--")}, rest, D.__doc__,
                            (*_cli.preset_flags(preset, PRESETS), _overwrite(D.STAGE)))
    D.require_filesystems(cfg)
    return cfg, flags["overwrite"]


def parse_evaluate(argv: Sequence[str] | None = None) -> tuple[E.EvaluateConfig, bool]:
    """(config, overwrite) of ``python pipelines/evaluate.py``, over the preset's recipe."""
    preset, data, rest = _stage_args(E.STAGE, argv)
    if "sweeps" in data:
        data["sweeps"] = sweeps_from_data(data["sweeps"])
    if "ar_model" in data:
        data["ar_model"] = _cli.none_word(data["ar_model"])
    default = _cli.apply(dataclasses.replace(get_recipe(preset).evaluate, preset=preset), data, "config")
    spec = evaluate_spec(hidden={"preset"},  # set by --preset
                         aliases={"models": ("--model",), "sweeps": ("--sweep",), "sampler_params": ("--param",)})
    rest = _cli.merge_repeated(rest, (("--models", "--model"), ("--sweeps", "--sweep"),
                                      ("--sampler-params", "--param")))
    cfg, flags = _cli.parse(E.EvaluateConfig, default, {E.EvaluateConfig: spec}, rest, E.__doc__,
                            (*_cli.preset_flags(preset, PRESETS), _overwrite(E.STAGE)))
    E.require_filesystems(cfg)
    return cfg, flags["overwrite"]


# -- the main job -----------------------------------------------------------------------------------
def recipe_from_data(base: Recipe, data: dict) -> Recipe:
    """``base`` with the values of a config file (the shape of ``recipe.yaml``): shared fields set once."""
    unknown = sorted(set(data) - set(SHARED) - set(STAGE_FIELDS))
    if unknown:
        raise ValueError(f"config: unknown field(s) {unknown}; a recipe has {[*SHARED, *STAGE_FIELDS]} and the run's "
                         "run_dir, skip, overwrite, pretrain, serve (a bool), push_to_hub")
    shared = {name: data.get(name, getattr(base, name)) for name in SHARED}
    shared["ar_model"] = _cli.none_word(shared["ar_model"])
    stages = {}
    for name in STAGE_FIELDS:
        values = dict(data.get(name) or {})
        for key, value in values.items():  # a stage's copy of a shared field must say the same as the top
            top = shared["teacher"] if (name, key) == ("evaluate", "models") else shared.get(key)
            same = value.get("teacher") == top if (name, key) == ("evaluate", "models") else value == top
            if key in SHARED and not same:
                raise ValueError(f"config: {name}.{key}={value!r} but {key}={top!r}: {key} is one setting shared "
                                 "by every stage; set it once at the top level")
        if name == "evaluate" and "sweeps" in values:
            values["sweeps"] = sweeps_from_data(values["sweeps"])
        stages[name] = _cli.apply(getattr(base, name), values, name) if values else getattr(base, name)
    return build({"preset": base.preset, **shared, **stages})


def full_specs(job: type, argv: Sequence[str]) -> dict[type, _cli.Spec]:
    """full.py's command line: the run's fields, the recipe's at the top (its shared fields and a group per stage);
    the stage fields that the recipe or the run directory decide are no flags."""
    shared = {"teacher", "prompts", "trust_remote_code", "gen_length", "block_length"}
    stages = _cli.Syntax("STAGE[,STAGE]", lambda words, _: tuple(s.strip() for w in words for s in w.split(",")
                                                                  if s.strip()), list)
    return {
        Recipe: _cli.Spec(hidden=frozenset({"preset"}), build=build, syntax={"ar_model": _cli.optional_text()}),
        P.TrajectoriesConfig: _cli.Spec(hidden=frozenset({"out", *shared}), aliases={"n_prompts": ("--n-prompts",)}),
        D.DistillConfig: _distill_spec(argv, "--distill.", hidden=frozenset({"trajectories", "out", "storage",
                                                                              "push_to_hub", "trust_remote_code"}),
                                       aliases={"max_steps": ("--distill-steps",), "masking": ("--masking",)}),
        E.EvaluateConfig: evaluate_spec(hidden={"models", "ar_model", "out", "gen_length", "block_length",
                                                "trust_remote_code", "preset"},
                                        aliases={"n": ("--n-eval",), "sweeps": ("--sweeps",),
                                                 "sampler_params": ("--param",)}),
        ServeConfig: _cli.Spec(hidden=frozenset({"model", "trust_remote_code", "preset", "tokenizer", "sampler_params",
                                                 "limits", "autoscaling"})),
        job: _cli.Spec(flat=frozenset({"recipe"}), syntax={"skip": stages, "overwrite": stages}),
    }


def parse_full(job: type, argv: Sequence[str] | None = None, description: str | None = None) -> Any:
    """The ``job`` (``full.FullConfig``: the run's fields and a ``recipe``) of ``python pipelines/full.py``.

    The job's class comes from its caller, so that the main job imports this module and not the
    reverse.
    """
    argv = sys.argv[1:] if argv is None else argv
    preset, data, rest = _cli.pre_parse(argv, PRESETS, DEFAULT_PRESET)
    hints = typing.get_type_hints(job)
    run = {f.name for f in dataclasses.fields(job)} - {"recipe"}
    values = {f.name: f.default for f in dataclasses.fields(job) if f.name in run}
    values.update({k: _cli.coerce(hints[k], data.pop(k)) for k in run - {"serve"} if k in data})
    if isinstance(data.get("serve"), bool):  # the run's serve smoke test, not the recipe's serve section
        values["serve"] = data.pop("serve")
    values["recipe"] = recipe_from_data(get_recipe(preset), data)
    rest = _cli.merge_repeated(rest, (("--evaluate.sweeps", "--sweeps"), ("--evaluate.sampler-params", "--param")))
    cfg, _ = _cli.parse(job, values, full_specs(job, rest), rest, description or "",
                        _cli.preset_flags(preset, PRESETS))
    return cfg


# -- running a stage from its command line ------------------------------------------------------------
def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep a local cluster on 127.0.0.1
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _trajectories(argv: Sequence[str] | None) -> dict:
    cfg, overwrite = parse_trajectories(argv)
    logger.info("trajectories config:\n%s", _cli.to_yaml(cfg))
    return P.run(cfg, overwrite)


def _distill(argv: Sequence[str] | None) -> dict:
    cfg, overwrite = parse_distill(argv)
    logger.info("distill config:\n%s", _cli.to_yaml(cfg))
    summary = D.run_distill(cfg, overwrite)
    print(json.dumps({k: summary[k] for k in ("init", "rows", "steps", "train_seconds")}, indent=2))
    return summary


def _evaluate(argv: Sequence[str] | None) -> dict:
    cfg, overwrite = parse_evaluate(argv)
    logger.info("evaluate config:\n%s", _cli.to_yaml(cfg))
    report = E.run_evaluation(cfg, overwrite)
    for task, systems in report["aup"].items():
        for system, value in systems.items():
            print(f"{task:12s} {system:28s} AUP {value:8.2f}")
    return report


COMMANDS = {P.STAGE: _trajectories, D.STAGE: _distill, E.STAGE: _evaluate}


def main(command: str | None = None, argv: Sequence[str] | None = None) -> Any:
    """Run a stage's command line: ``command`` (default: the script's name, ``pipelines/distill.py`` is
    ``distill``, or the first argument of ``python -m pipelines.cli``) on ``argv``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if command is None:
        command = Path(sys.argv[0]).stem
        if command not in COMMANDS and argv and argv[0] in COMMANDS:
            command = argv.pop(0)
    if command not in COMMANDS:
        raise SystemExit(f"usage: python -m pipelines.cli {{{','.join(COMMANDS)}}} [--help] (full.py is "
                         "python pipelines/full.py)")
    setup_logging()
    return _cli.run_main(lambda: COMMANDS[command](argv))


if __name__ == "__main__":
    main()
