"""``--set KEY=VALUE`` items: parsed as data and applied to a config tree before it is converted.

This module is torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from dmlkd.config.convert import from_dict
from dmlkd.errors import ConfigError

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


def load_config(cls: type[C], base: Mapping[str, Any] | None = None, overrides: Sequence[str] = ()) -> C:
    """Merge ``base`` (defaults already applied by the caller) with ``--set`` overrides, then convert."""
    tree = apply_overrides(dict(base or {}), overrides)
    return from_dict(cls, tree)


def given_tree(file_tree: Mapping[str, Any] | None, items: Sequence[str]) -> dict[str, Any]:
    """What the user gave explicitly: the ``--config`` file's values with the flags and ``--set`` items on top."""
    return apply_overrides(dict(file_tree or {}), items)
