"""The strict converter: JSON-compatible data to typed dataclasses and checked keyword options.

Values are checked against the declared field types and rejected with the dotted path of the bad key; nothing
is executed or imported. The config files, ``--set`` items and registered components' options all go through
``from_dict`` / ``convert_options`` here. This module is torch-free.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from dmlkd.errors import ConfigError, choices

C = TypeVar("C")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _expect(value: Any, accepted: Any, path: str, what: str) -> Any:
    """``value`` itself when it is an instance of ``accepted``, else the one-line error naming ``what``."""
    if not isinstance(value, accepted):
        raise ConfigError(f"{path}: expected {what}, got {value!r}")
    return value


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
        return from_dict(tp, _expect(value, Mapping, path, "a section (mapping)"), prefix=f"{path}.")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        item_type = args[0] if args else Any
        items = [
            _convert(item, item_type, f"{path}[{i}]")
            for i, item in enumerate(_expect(value, list | tuple, path, "a list"))
        ]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin is dict or tp is dict:
        return dict(_expect(value, Mapping, path, "a mapping"))
    if tp is bool:
        return _expect(value, bool, path, "true or false")
    if tp in (int, float):
        return _convert_number(value, tp, path)
    if tp is str:
        return _expect(value, str, path, "a string")
    raise ConfigError(f"{path}: unsupported field type {_type_name(tp)}")


def _convert_number(value: Any, tp: type, path: str) -> Any:
    """An int for an int field, a finite float for a float field (an int is accepted there); never a bool."""
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{path}: expected a finite number, got {value!r}")
    return float(value)


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
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing config key(s) {', '.join(prefix + name for name in missing)}")
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ConfigError(f"{prefix or cls.__name__}: {error}") from None


def option_parameters(factory: Any, context: Sequence[str] = ()) -> dict[str, tuple[Any, Any]]:
    """``{name: (type, default)}`` of the keyword options of ``factory`` (a class: its ``__init__``).

    The options are the annotated parameters besides ``self``, ``*args``/``**kwargs`` and the ``context``
    arguments the caller supplies, plus, for a class whose ``__init__`` passes ``**kwargs`` on, those of its
    base class; a parameter without a default has default ``dataclasses.MISSING``.
    """
    target = factory.__init__ if isinstance(factory, type) else factory
    hints = typing.get_type_hints(target)
    result: dict[str, tuple[Any, Any]] = {}
    for parameter in inspect.signature(target).parameters.values():
        if parameter.name in ("self", *context) or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        default = dataclasses.MISSING if parameter.default is parameter.empty else parameter.default
        result[parameter.name] = (hints.get(parameter.name, Any), default)
    passes_on = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(target).parameters.values())
    if passes_on and isinstance(factory, type):  # ``**options`` go to the base class: its options count too
        base = next(cls for cls in factory.__mro__[1:] if "__init__" in vars(cls))
        result |= {k: v for k, v in option_parameters(base, context).items() if k not in result}
    return result


def convert_options(factory: Any, options: Mapping[str, Any], what: str, context: Sequence[str] = ()) -> dict[str, Any]:
    """Check ``options`` against ``factory``'s annotated signature with the converter of the config files.

    Returns the options converted to their declared types (an int given for a float option becomes a float).

    Raises:
        ConfigError: one line for an unknown option (listing the valid ones), a missing one, or a value of
            the wrong type (naming ``what``, the option and the bad value).
    """
    parameters = option_parameters(factory, context)
    for key in options:
        if key not in parameters:
            raise ConfigError(f"unknown option {key!r} for {what}; valid options: {choices(parameters) or 'none'}")
    missing = [name for name, (_, default) in parameters.items() if default is dataclasses.MISSING]
    missing = [name for name in missing if name not in options]
    if missing:
        raise ConfigError(f"{what} needs option(s) {', '.join(missing)}")
    return {key: _convert(value, parameters[key][0], f"{what} option {key}") for key, value in options.items()}


def to_dict(config: Any) -> dict[str, Any]:
    """The JSON-compatible dictionary of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))
