"""Subpackages and modules loaded on first attribute access (the lazy ``__getattr__`` of package facades)."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType


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
