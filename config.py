"""Configuration as plain, typed data.

Configs are nested dataclasses built from JSON-compatible dictionaries. Nothing in a config is ever
executed or imported: values are parsed as data only (``json``), checked against the dataclass field types
and rejected with the dotted path of the bad key. ``--set a.b=value`` overrides are applied to the
dictionary before conversion, so a config file, a recipe and the command line all go through one strict
path. This module is torch-free.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from dmlkd.errors import ConfigError, choices

C = TypeVar("C")


def parse_value(text: str) -> Any:
    """Parse an override value: JSON when it parses (``3``, ``1e-4``, ``true``, ``[1,2]``), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree["a"]["b"] = value`` for ``key == "a.b"``, creating intermediate dictionaries."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"malformed key {key!r} in --set; expected dotted names such as optim.lr")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``KEY=VALUE`` strings to a (deep-copied) config dictionary."""
    result = json.loads(json.dumps(tree))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        set_dotted(result, key.strip(), parse_value(value.strip()))
    return result


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not valid; choose from: {choices(map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a section (mapping), got {value!r}")
        return from_dict(tp, value, prefix=f"{path}.")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [_convert(item, item_type, f"{path}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported field type {_type_name(tp)}")


def from_dict(cls: type[C], data: Mapping[str, Any], prefix: str = "") -> C:
    """Build dataclass ``cls`` from ``data`` strictly: unknown keys and wrong types are ``ConfigError``."""
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [key for key in data if key not in fields]
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}; valid keys here: {choices(prefix + n for n in fields)}"
        )
    kwargs = {name: _convert(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ConfigError(f"{prefix or cls.__name__}: {error}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """The JSON-compatible dictionary of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def load_config(cls: type[C], base: Mapping[str, Any] | None = None, overrides: Sequence[str] = ()) -> C:
    """Merge ``base`` (defaults already applied by the caller) with ``--set`` overrides, then convert."""
    tree = apply_overrides(dict(base or {}), overrides)
    return from_dict(cls, tree)


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from ``path``; a missing or malformed file is a ``ConfigError`` naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a JSON object")
    return data


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of two config dictionaries; values of ``update`` win."""
    result = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merge(result[key], value)
        else:
            result[key] = value
    return result
