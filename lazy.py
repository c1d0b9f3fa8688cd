"""Subpackages and modules loaded on first attribute access (the lazy ``__getattr__`` of package facades)."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from types import ModuleType
from typing import Any


def submodule(package: str, name: str) -> ModuleType:
    """``package.name`` imported on demand; an ``AttributeError`` (as for any missing attribute) otherwise."""
    if not name.startswith("_"):
        try:
            found = importlib.util.find_spec(f"{package}.{name}") is not None
        except (ImportError, ValueError):  # ``package`` is not a package (e.g. imported as a plain file)
            found = False
        if found:
            return importlib.import_module(f"{package}.{name}")
    raise AttributeError(f"module {package!r} has no attribute {name!r}")


def lazy_name(package: str, name: str, homes: Mapping[str, str], first: str | None = None) -> Any:
    """A facade's name ``name`` from its home module in ``homes``, imported on first use; else a submodule.

    ``first`` is a module imported before any home module, for names that need it loaded (the built-in
    registrations of a registry). Any other name is ``submodule(package, name)``.
    """
    if name not in homes:
        return submodule(package, name)
    if first is not None:
        importlib.import_module(first)
    return getattr(importlib.import_module(homes[name]), name)
