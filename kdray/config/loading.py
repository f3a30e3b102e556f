"""YAML and `key.sub=value` overrides into typed dataclasses, strictly.

Unknown keys and wrong types stop the load with a `ConfigError` naming the dotted key, the value and what the
field accepts. Values of overrides are parsed as YAML scalars (`3`, `0.5`, `true`, `[512, 1024]`, `null`). A
float-typed key also takes scientific notation that YAML 1.1 leaves a string (`1e-4`, `1E5`), in files and overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kdray.config.options import RegistrySections
from kdray.errors import ConfigError

T = TypeVar("T")


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list, each item {_describe(args[0])}"
        return f"a list of {len(args)} {_describe(args[0])}s"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        extra = list(tp.registered_sections()) if issubclass(tp, RegistrySections) else []
        return "a mapping of " + ", ".join([*(f.name for f in dataclasses.fields(tp)), *extra])
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


# Scientific notation without a decimal point or without a signed exponent (1e-4, 1E5, -2e-3, 1.5e3): YAML 1.1,
# which PyYAML implements, reads these as strings; a float-typed key takes them as the number they spell.
_FLOAT_LITERAL = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+")


def float_literal(text: str) -> float | None:
    """`"1e-4"` -> 0.0001: the number a string in scientific notation spells, else None."""
    text = text.strip()
    return float(text) if _FLOAT_LITERAL.fullmatch(text) else None


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp` or raise ConfigError for `key`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            first = dataclasses.fields(tp)[0].name if dataclasses.fields(tp) else "KEY"
            raise ConfigError(f"{key}: got {value!r}; expected {_describe(tp)} (one of them on the command line: "
                              f"{key}.{first}={value})")
        return build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: got {value!r}; expected {_describe(tp)}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise ConfigError(f"{key}: got {value!r}; expected {_describe(tp)}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{key}: got {value!r}; expected {_describe(tp)}")
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: got {value!r}; expected {_describe(tp)}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: got {value!r}; expected true/false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: got {value!r}; expected an integer")
        return value
    if tp is float:
        if isinstance(value, str) and (number := float_literal(value)) is not None:
            return number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: got {value!r}; expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: got {value!r}; expected a string")
        return value
    raise TypeError(f"kdray.config cannot handle the annotation {tp!r} of {key}")  # a bug in the schema


def build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a plain mapping; missing keys keep their defaults."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    sections = cls.registered_sections() if issubclass(cls, RegistrySections) else {}
    kwargs, built_sections = {}, {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key in sections:
            built_sections[key] = _convert(value, sections[key], dotted)
        elif key in names:
            kwargs[key] = _convert(value, hints[key], dotted)
        else:
            valid = [*names, *sections]
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            plugin = f"; a {cls.section_kind} of your own comes in by naming its file under `plugins`" \
                if sections and not close else ""
            raise ConfigError(f"{dotted}: unknown key{hint}; valid keys here: {', '.join(valid)}{plugin}")
    obj = cls(**kwargs)
    for key, section in built_sections.items():
        setattr(obj, key, section)
    return obj


def to_dict(obj: Any) -> Any:
    """The dataclass as plain YAML-ready data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        out = {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, RegistrySections):
            out.update((name, to_dict(section)) for name, section in obj.sections().items())
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """`"losses.kd.weight=0.5"` -> `("losses.kd.weight", 0.5)`."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key.sub=value, e.g. losses.kd.weight=0.5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({err.problem})") from None
    return key, value


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set each dotted key in a copy of the nested mapping `data` (unknown keys are caught by `build`)."""
    out = _deepcopy(data)
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{dotted}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from `path`, or a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data
