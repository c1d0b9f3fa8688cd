"""Named component registries.

Each owning package fills its registry in its own ``__init__`` (``dmlkd.teacher`` registers the teacher
losses, ``dmlkd.models`` the backbones, ...), so importing the package is always enough. This module is
torch-free. Names are explicit snake_case strings, never class names, so renaming a class never breaks a
saved config.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from dmlkd.errors import ConfigError, choices

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a public name to a factory (a class or builder function) of one component kind."""

    def __init__(self, kind: str, owner: str) -> None:
        self.kind = kind
        self._owner = owner  # module whose import fills this registry
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(factory: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = factory
            return factory

        return add

    def _populate(self) -> None:
        # Importing the owner module registers every built-in component (a no-op after the first time).
        importlib.import_module(self._owner)

    def get(self, name: str) -> T:
        self._populate()
        if name not in self._items:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose from: {choices(self._items)}")
        return self._items[name]

    def build(self, name: str, /, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)  # type: ignore[operator]

    def names(self) -> list[str]:
        self._populate()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._populate()
        return name in self._items


BACKBONES: Registry[Callable[..., Any]] = Registry("architecture", "dmlkd.models.registered")
DATASETS: Registry[Callable[..., Any]] = Registry("dataset", "dmlkd.data.catalog")
TEACHER_LOSSES: Registry[Callable[..., Any]] = Registry("loss", "dmlkd.teacher.losses")
TRANSFER_METHODS: Registry[Callable[..., Any]] = Registry("transfer method", "dmlkd.transfer.methods")
