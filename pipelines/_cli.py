"""Command lines generated from the stage config dataclasses (tyro), with presets and YAML config files.

Every pipeline's CLI is the same shape::

    python pipelines/X.py [--preset NAME] [--config FILE.yaml] [--FIELD VALUE ...]

- defaults come from the preset's :class:`~pipelines.recipes.Recipe` (the single source);
- ``--config FILE`` (YAML, the shape :func:`to_yaml` prints and the run directory keeps) is
  applied on top of the preset, then the flags on top of that;
- every field has a flag with its help text (the field's comment) and its default shown;
  booleans are ``--x`` / ``--no-x``; tuples take several values;
- the values are checked by the dataclasses themselves, after parsing and before any work: a
  bad value is a :class:`ValueError` naming the value, the rule and the fix.

The CLI is built on *views* of the config classes: subclasses whose fields may be hidden
(values a caller binds, e.g. a stage's output path inside ``full.py``), aliased (``--n-prompts``
for ``--trajectories.n-prompts``) or parsed from another form (``NAME=URI`` pairs for a dict),
and whose ``__post_init__`` does nothing, so that validation happens once, in the real class.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import logging
import sys
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Mapping, Sequence

import tyro
import yaml

logger = logging.getLogger(__name__)

CONFIG_FLAG = "--config"


@dataclass(frozen=True)
class Transform:
    """A field parsed in another form on the command line: ``view_type`` there, converted both ways."""

    view_type: Any
    to_view: Callable[[Any], Any]
    from_view: Callable[[Any], Any]


@dataclass(frozen=True)
class ViewSpec:
    """How one config class appears on a command line."""

    cls: type
    hidden: frozenset[str] = frozenset()
    aliases: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    transforms: Mapping[str, Transform] = dataclasses.field(default_factory=dict)
    nested: Mapping[str, "ViewSpec"] = dataclasses.field(default_factory=dict)
    extra: tuple[tuple[str, Any, Any, str], ...] = ()  # (name, type, default, help) fields only the CLI has
    build: Callable[[dict], Any] | None = None  # builds the real config from field values (default: cls(**values))
    helps: Mapping[str, str] = dataclasses.field(default_factory=dict)  # help text replacing the field's comment


def _help(cls: type, name: str) -> str | None:
    """The field's help text as tyro reads it (docstring or comment in the class source)."""
    try:
        from tyro import _docstrings

        return _docstrings.get_field_docstring(cls, name, ())
    except (ImportError, AttributeError, TypeError, OSError):  # a tyro without this helper: no help text
        return None


class View:
    """A tyro-parsable subclass of ``spec.cls`` plus the conversions between it and the real class."""

    def __init__(self, spec: ViewSpec) -> None:
        self.spec = spec
        self.children = {name: View(child) for name, child in spec.nested.items()}
        hints = typing.get_type_hints(spec.cls)
        annotations: dict[str, Any] = {}
        namespace: dict[str, Any] = {"__module__": spec.cls.__module__, "__post_init__": lambda self: None,
                                     "__qualname__": spec.cls.__qualname__}
        for f in dataclasses.fields(spec.cls):
            marks: list[Any] = []
            kind = hints[f.name]
            if f.name in self.children:
                kind = self.children[f.name].cls
            elif f.name in spec.transforms:
                kind = spec.transforms[f.name].view_type
            if f.name in spec.hidden:
                marks.append(tyro.conf.Suppress)
            else:
                text = spec.helps.get(f.name) or _help(spec.cls, f.name)
                marks.append(tyro.conf.arg(aliases=spec.aliases.get(f.name) or None, help=text))
            annotations[f.name] = Annotated[(kind, *marks)]
            namespace[f.name] = dataclasses.field(default=None)
        for name, kind, default, text in spec.extra:
            annotations[name] = Annotated[kind, tyro.conf.arg(help=text)]
            namespace[name] = dataclasses.field(default=default)
        namespace["__annotations__"] = annotations
        self.cls = dataclass(frozen=True)(type(spec.cls.__name__, (), namespace))

    def to_view(self, obj: Any, extra: Mapping[str, Any] | None = None) -> Any:
        values = {}
        for f in dataclasses.fields(self.spec.cls):
            value = getattr(obj, f.name)
            if f.name in self.children:
                value = self.children[f.name].to_view(value)
            elif f.name in self.spec.transforms:
                value = self.spec.transforms[f.name].to_view(value)
            values[f.name] = value
        for name, _, default, _ in self.spec.extra:
            values[name] = (extra or {}).get(name, default)
        return self.cls(**values)

    def from_view(self, view: Any) -> Any:
        """The real (validated) config; raises the real class's ValueError for a bad value."""
        values = {}
        for f in dataclasses.fields(self.spec.cls):
            value = getattr(view, f.name)
            if f.name in self.children:
                value = self.children[f.name].from_view(value)
            elif f.name in self.spec.transforms:
                value = self.spec.transforms[f.name].from_view(value)
            values[f.name] = value
        return self.spec.build(values) if self.spec.build else self.spec.cls(**values)

    def extras(self, view: Any) -> dict[str, Any]:
        return {name: getattr(view, name) for name, *_ in self.spec.extra}


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


def _coerce(kind: Any, value: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin is Annotated:
        return _coerce(typing.get_args(kind)[0], value)
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(kind)
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v) for v in value)
    if origin in (dict, collections.abc.Mapping) and isinstance(value, dict):
        args = typing.get_args(kind)
        return {k: _coerce(args[1], v) for k, v in value.items()} if len(args) == 2 else dict(value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        for arg in typing.get_args(kind):
            if arg is not type(None) and value is not None:
                return _coerce(arg, value)
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
            changes[name] = _coerce(hints[name], value)
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
            raise ValueError(f"--config {path!r}: not valid YAML ({err})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path!r}: the top level must be a mapping of field names to values")
    return data


# -- parsing --------------------------------------------------------------------------------------
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


def parse(spec: ViewSpec, default: Any, argv: Sequence[str], description: str, preset: str,
          presets: Sequence[str], extra_defaults: Mapping[str, Any] | None = None,
          repeatable: Sequence[Sequence[str]] = ()) -> tuple[Any, dict[str, Any]]:
    """Parse ``argv`` over ``default``; returns (validated config, values of the CLI-only fields).

    ``--preset`` and ``--config`` were read by :func:`pre_parse`; they are listed here so that
    ``--help`` shows them.
    """
    spec = dataclasses.replace(spec, extra=(
        ("preset", str, preset, f"the recipe whose values are the defaults: one of {list(presets)}"),
        ("config", typing.Optional[str], None, "YAML file of field values applied over the preset (e.g. a run "
                                               "dir's recipe.yaml); flags apply over it"),
        *spec.extra))
    view = View(spec)
    parsed = tyro.cli(view.cls, default=view.to_view(default, extra_defaults), args=merge_repeated(argv, repeatable),
                      description=description)
    extras = view.extras(parsed)
    extras.pop("preset"), extras.pop("config")
    return view.from_view(parsed), extras


def none_word(value: Any) -> Any:
    """``none`` in any case is None (tyro reads only ``None``): ``--ar-model none`` means no AR baseline."""
    return None if isinstance(value, str) and value.strip().lower() == "none" else value


def optional_text() -> Transform:
    """An optional string field whose ``none`` (any case) on the command line is None."""
    return Transform(typing.Optional[str], lambda value: value, none_word)


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
