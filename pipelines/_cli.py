"""The machinery :mod:`pipelines.cli` builds every command line with: tyro over the config dataclasses, and YAML.

Every pipeline's CLI is the same shape::

    python pipelines/X.py [--preset NAME] [--config FILE.yaml] [--FIELD VALUE ...]

- ``--preset`` and ``--config FILE`` are read first (:func:`pre_parse`): the preset's recipe,
  with the file's values over it, gives the defaults every other flag is shown with;
- every field of the config dataclass is a flag with its help text (the field's comment) and its
  default; booleans are ``--x`` / ``--no-x``; tuples take several values; nested configs are
  flag groups (``--trajectories.seed``);
- a :class:`Spec` says how one config class appears on one command line: fields the caller
  decides are hidden, some have short aliases (``--n-prompts``), some are typed in another
  :class:`Syntax` (``NAME=URI`` items for a dict);
- tyro returns the values as typed (nothing is built or validated inside tyro), and each config
  is then built once by its own class, which checks it: a bad value is a :class:`ValueError`
  naming the value, the rule and the fix (:func:`run_main` prints it as one line, exit code 2).

The config dataclasses stay plain: the command line is described beside them, through tyro's
constructor registry, not by classes generated at run time.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Mapping, Sequence

import tyro
import yaml
from tyro.constructors import ConstructorRegistry, PrimitiveConstructorSpec, StructConstructorSpec, StructFieldSpec

CONFIG_FLAG = "--config"


@dataclass(frozen=True)
class Syntax:
    """A field typed in another form on the command line, parsed once after tyro (``NAME=URI`` items for a dict)."""

    metavar: str
    parse: Callable[[list[str], Any], Any]  # (the words typed, the field's default) -> the field's value
    show: Callable[[Any], list[str]]  # a value as it would be typed (the default in --help)
    nargs: int | str = "*"


@dataclass(frozen=True)
class Spec:
    """How one config class appears on one command line."""

    hidden: frozenset[str] = frozenset()  # fields the caller decides (set from the default, no flag)
    aliases: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    syntax: Mapping[str, Syntax] = dataclasses.field(default_factory=dict)
    helps: Mapping[str, str] = dataclasses.field(default_factory=dict)  # help text replacing the field's comment
    flat: frozenset[str] = frozenset()  # nested configs whose flags take no prefix (full.py's recipe)
    build: Callable[[dict], Any] | None = None  # builds the config from its field values (default: cls(**values))


@dataclass(frozen=True)
class Flag:
    """A flag of a command that is no config field (``--overwrite``, ``--preset``)."""

    name: str
    kind: Any
    default: Any
    help: str


def _help(cls: type, name: str) -> str | None:
    """The field's help text as tyro reads it (docstring or comment in the class source)."""
    try:
        from tyro import _docstrings

        return _docstrings.get_field_docstring(cls, name, ())
    except (ImportError, AttributeError, TypeError, OSError):  # a tyro without this helper: no help text
        return None


class _Typed:
    """The words typed for a :class:`Syntax` field: tyro hands them over unparsed."""

    def __init__(self, words: list[str]) -> None:
        self.words = list(words)


@dataclass(frozen=True)
class _Values:
    """One config's field values as parsed: built into the config after tyro returns."""

    cls: type
    default: Any
    values: dict[str, Any]


class _Command:
    """The root of a command line; its fields come from :func:`_registry`."""


def _registry(specs: Mapping[type, Spec], root: tuple[StructFieldSpec, ...]) -> ConstructorRegistry:
    registry = ConstructorRegistry()

    @registry.struct_rule
    def config_struct(info):
        if info.type is _Command:
            return StructConstructorSpec(instantiate=lambda **values: values, fields=root)
        spec = specs.get(info.type)
        if spec is None:
            return None
        cls, default = info.type, info.default
        return StructConstructorSpec(instantiate=lambda **values: _Values(cls, default, values),
                                     fields=_fields(cls, spec, default))

    return registry


def _default(default: Any, name: str) -> Any:
    return default[name] if isinstance(default, Mapping) else getattr(default, name)


def _fields(cls: type, spec: Spec, default: Any) -> tuple[StructFieldSpec, ...]:
    """The flags of ``cls``'s fields, with defaults from ``default`` (an instance, or field values)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind, value = hints[f.name], _default(default, f.name)
        if f.name in spec.hidden:
            out.append(StructFieldSpec(f.name, Annotated[kind, tyro.conf.Suppress], value))
            continue
        marks: list[Any] = [tyro.conf.arg(aliases=spec.aliases.get(f.name) or None,
                                          name="" if f.name in spec.flat else None)]
        syntax = spec.syntax.get(f.name)
        if syntax is not None:
            kind = Any
            marks.append(PrimitiveConstructorSpec(nargs=syntax.nargs, metavar=syntax.metavar, instance_from_str=_Typed,
                                                  is_instance=lambda _: True, str_from_instance=syntax.show))
        out.append(StructFieldSpec(f.name, Annotated[(kind, *marks)], value,
                                   helptext=spec.helps.get(f.name) or _help(cls, f.name)))
    return tuple(out)


def _build(parsed: Any, specs: Mapping[type, Spec]) -> Any:
    """The configs of a parse, each built once by its class (inner ones first)."""
    if not isinstance(parsed, _Values):
        return parsed
    spec = specs[parsed.cls]
    values = {}
    for name, value in parsed.values.items():
        if isinstance(value, _Typed):
            value = spec.syntax[name].parse(value.words, _default(parsed.default, name))
        values[name] = _build(value, specs)
    return spec.build(values) if spec.build else parsed.cls(**values)


def parse(cls: type, default: Any, specs: Mapping[type, Spec], argv: Sequence[str], description: str,
          flags: Sequence[Flag] = ()) -> tuple[Any, dict[str, Any]]:
    """``argv`` over ``default`` (a ``cls``, or its field values), whose fields are the top-level flags.

    ``specs`` says how each config class appears (``cls`` and every nested one); ``flags`` are the
    command's own. Returns (the config, built and validated by its classes; the values of ``flags``).
    """
    own = {f"flag:{f.name}": f for f in flags}  # kept apart from the config's field names (evaluate's preset)
    root = (*_fields(cls, specs[cls], default),
            *(StructFieldSpec(key, Annotated[f.kind, tyro.conf.arg(name=f.name)], f.default, helptext=f.help)
              for key, f in own.items()))
    parsed = tyro.cli(_Command, args=list(argv), description=description, registry=_registry(specs, root))
    config = _Values(cls, default, {key: value for key, value in parsed.items() if key not in own})
    return _build(config, specs), {f.name: parsed[key] for key, f in own.items()}


def preset_flags(preset: str, presets: Sequence[str]) -> tuple[Flag, ...]:
    """``--preset`` and ``--config``, read by :func:`pre_parse`; listed so that ``--help`` shows them."""
    return (Flag("preset", str, preset, f"the recipe whose values are the defaults: one of {list(presets)}"),
            Flag("config", typing.Optional[str], None, "YAML file of field values applied over the preset (e.g. "
                                                       "a run dir's recipe.yaml); flags apply over it"))


# -- dataclass <-> plain data (YAML) ----------------------------------------------------------------
def to_data(obj: Any) -> Any:
    """Nested plain data (dicts, lists, scalars) of a config, in field order."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_data(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [to_data(v) for v in obj]
    return obj


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_data(obj), sort_keys=False, default_flow_style=False, width=120)


def coerce(kind: Any, value: Any, name: str = "value") -> Any:
    """A config file's ``value`` as the field type ``kind``: lists become tuples, numbers typed as text
    (YAML reads ``1e-4`` as a string) become numbers; a value of another kind is a ValueError naming ``name``."""
    origin = typing.get_origin(kind)
    if origin is Annotated:
        return coerce(typing.get_args(kind)[0], value, name)
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(kind)
        inner = args[0] if args else Any
        return tuple(coerce(inner, v, name) for v in value)
    if origin in (dict, collections.abc.Mapping) and isinstance(value, dict):
        args = typing.get_args(kind)
        return {k: coerce(args[1], v, f"{name}[{k!r}]") for k, v in value.items()} if len(args) == 2 else dict(value)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(kind):
            if arg is not type(None) and value is not None:
                return coerce(arg, value, name)
    if kind is bool and not isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: expected true or false")
    if kind in (int, float) and not isinstance(value, (int, float)) or kind is int and isinstance(value, bool):
        try:
            return kind(value) if isinstance(value, str) else kind(None)
        except (TypeError, ValueError):
            raise ValueError(f"{name}={value!r}: expected {'an integer' if kind is int else 'a number'}") from None
    if kind is str and not isinstance(value, str):
        raise ValueError(f"{name}={value!r}: expected text")
    return value


def apply(obj: Any, data: Mapping[str, Any], where: str = "") -> Any:
    """``obj`` with the values in ``data`` (nested dicts for nested configs), validated by the class."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where or 'config'}: expected a mapping of field names to values, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where or 'config'}: unknown field(s) {unknown}; {type(obj).__name__} has "
                         f"{sorted(names)}")
    changes = {}
    for name, value in data.items():
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            changes[name] = apply(current, value, f"{where}.{name}" if where else name)
        else:
            changes[name] = coerce(hints[name], value, f"{where}.{name}" if where else name)
    return dataclasses.replace(obj, **changes)


def read_config_file(path: str) -> dict:
    from pipelines import _io

    if not _io.exists(path):
        raise ValueError(f"--config {path!r}: no such file; give a YAML file (e.g. the recipe.yaml of a run dir)")
    fs, root = _io.fs_root(path)
    with fs.open(root, "r") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ValueError(f"--config {path!r}: not valid YAML ({' '.join(str(err).split())})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path!r}: the top level must be a mapping of field names to values")
    return data


# -- argv -----------------------------------------------------------------------------------------
def pre_parse(argv: Sequence[str], presets: Sequence[str], default_preset: str) -> tuple[str, dict, list[str]]:
    """``--preset`` and ``--config`` first (they decide the defaults every other flag is shown with)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--preset", default=None)
    p.add_argument(CONFIG_FLAG, default=None)
    known, rest = p.parse_known_args(list(argv))
    data = read_config_file(known.config) if known.config else {}
    preset = known.preset or data.pop("preset", None) or default_preset
    data.pop("preset", None)
    if preset not in presets:
        raise ValueError(f"preset={preset!r}: must be one of {list(presets)}")
    return preset, data, rest


def merge_repeated(argv: Sequence[str], groups: Sequence[Sequence[str]]) -> list[str]:
    """``--model a=1 --model b=2`` -> ``--model a=1 b=2``: repeating a list flag adds to it, as it always did.

    Each group names one field's flags (the flag and its aliases); their values are gathered at the
    first occurrence.
    """
    out: list[str] = []
    firsts: dict[int, int] = {}  # group -> index in out of its first flag
    args = list(argv)
    i = 0
    while i < len(args):
        group = next((g for g, names in enumerate(groups) if args[i] in names), None)
        if group is None:
            out.append(args[i])
            i += 1
            continue
        j = i + 1
        while j < len(args) and not args[j].startswith("--"):
            j += 1
        values = args[i + 1:j]
        if group in firsts:
            at = firsts[group] + 1
            while at < len(out) and not out[at].startswith("--"):
                at += 1
            out[at:at] = values
        else:
            firsts[group] = len(out)
            out += [args[i], *values]
        i = j
    return out


def stage_section(data: dict, stage: str) -> dict:
    """A stage CLI's part of a config file: the file's ``stage:`` section when it is a whole recipe (recipe.yaml)."""
    section = data.get(stage)
    return dict(section) if isinstance(section, dict) else data


def none_word(value: Any) -> Any:
    """``none`` in any case is None (tyro reads only ``None``): ``--ar-model none`` means no AR baseline."""
    return None if isinstance(value, str) and value.strip().lower() == "none" else value


def optional_text() -> Syntax:
    """An optional string field whose ``none`` (any case) on the command line is None."""
    return Syntax("{None}|STR", lambda words, _: none_word(words[0]), lambda value: [str(value)], nargs=1)


def given(argv: Sequence[str], flag: str) -> bool:
    """Whether ``flag`` (``--a-b``; tyro also reads ``--a_b`` and ``--a-b=VALUE``) is on the command line."""
    name = flag.replace("_", "-")
    return any(a.split("=", 1)[0].replace("_", "-") == name for a in argv if a.startswith("--"))


def run_main(fn: Callable[[], Any]) -> Any:
    """Run a CLI's main: a bad value or a missing input (found before any work) is one clear line and exit 2."""
    try:
        return fn()
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
