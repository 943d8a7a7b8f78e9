"""Typed config loading: YAML mappings → dataclasses, with errors that name the key.

Every config object (recipes, launch profiles) is a dataclass. `build(cls, data, where)` checks that each key
exists (suggesting the closest one when it does not), that each value has the declared type, and then runs the
dataclass's own `check()` for value ranges and combinations. Errors carry the full dotted key path.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid. The message names the file and the key."""


def error_line(err: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message` (cut at `limit`): how a one-line verdict quotes an exception."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:limit] if text else ''}"


def closest(name: str, options: typing.Iterable[str]) -> str | None:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return match[0] if match else None


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        (inner,) = get_args(tp)
        return f"a list of {_type_name(inner)}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            # A mapping given for an optional dataclass (`method: {...}` on a stage) is that dataclass or an
            # error: keep its own message (unknown key + suggestion, value range) rather than a generic one.
            if isinstance(value, dict) and dataclasses.is_dataclass(option):
                return _convert(value, option, key)
        errors = []
        for option in get_args(tp):
            try:
                return _convert(value, option, key)
            except ConfigError as err:
                errors.append((option, err))
        for option, err in errors:
            # A name that is none of the allowed ones, or a list with a wrong item: that option's own message
            # (it names the item and the closest allowed value), not the generic one.
            if (get_origin(option) is Literal and isinstance(value, str)) or (
                    get_origin(option) is list and isinstance(value, list)):
                raise err
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        hint = closest(str(value), [str(a) for a in get_args(tp)])
        extra = f" (did you mean {hint!r}?)" if hint else ""
        raise ConfigError(f"{key}: {value!r} is not one of {_type_name(tp)}{extra}")
    if origin is list:
        (inner,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads `2e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported schema type {tp!r} at {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def build(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping. `where` is the key path used in errors."""
    prefix = f"{where}." if where else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            hint = closest(str(key), fields)
            extra = f"; did you mean '{prefix}{hint}'?" if hint else f"; valid keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"{prefix}{key}: unknown key{extra}")
        kwargs[key] = _convert(value, hints[key], f"{prefix}{key}")
    missing = [
        name for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]}: required key is missing")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(where)
    return obj


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def apply_override(data: dict, assignment: str, aliases: typing.Callable[[list, str], int | None] | None = None) -> None:
    """Apply one `a.b.c=value` override to a nested mapping in place. The value is parsed as YAML.

    List elements are addressed by index (`stages.1.beta`), or by name when `aliases(list, part)` resolves it.
    """
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected key=value")
    dotted, raw = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {assignment!r}: empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            index = int(part) if part.isdigit() else (aliases(node, part) if aliases else None)
            if index is None or not 0 <= index < len(node):
                raise ConfigError(f"override {dotted}: no list element {part!r} at {here}")
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"override {dotted}: {'.'.join(parts[:i])} is not a mapping or list")
