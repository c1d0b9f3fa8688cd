"""Named component registries.

Every component registers itself with a decorator in its own file (``@TEACHER_LOSSES.register("triplet")``
on the class); the registry's owner module imports those files, so asking a registry for a name is always
enough. A registry builds a component from typed options: the factory's annotated keyword parameters,
checked by the same strict converter as the config files (:func:`dmlkd.config.convert_options`), so no
component validates the types of its options by hand. This module is torch-free. Names are explicit
snake_case strings, never class names, so renaming a class never breaks a saved config.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from dmlkd.config.convert import convert_options, option_parameters
from dmlkd.errors import ConfigError, choices

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a public name to a factory (a class or builder function) of one component kind.

    ``context`` names the leading parameters the caller passes positionally (``num_classes`` and
    ``embedding_dim`` of a teacher loss, ...); every other parameter is an option.
    """

    def __init__(self, kind: str, owner: str, context: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.context = context
        self._owner = owner  # module whose import fills this registry
        self._factories: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the class or builder under ``name``."""

        def add(factory: T) -> T:
            if name in self._factories:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = factory
            return factory

        return add

    def unregister(self, name: str) -> None:
        """Forget ``name`` (for tests that register a throwaway component)."""
        del self._factories[name]

    def _populate(self) -> None:
        # Importing the owner module registers every built-in component (a no-op after the first time).
        importlib.import_module(self._owner)

    def get(self, name: str) -> T:
        self._populate()
        if name not in self._factories:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose from: {choices(self._factories)}")
        return self._factories[name]

    def options(self, name: str) -> dict[str, Any]:
        """The options of ``name`` and their defaults (``dataclasses.MISSING`` for a required one)."""
        return {key: default for key, (_, default) in option_parameters(self.get(name), self.context).items()}

    def check_options(self, name: str, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` converted to the declared types; a one-line ConfigError for a bad one."""
        return convert_options(self.get(name), options, f"{self.kind} {name!r}", self.context)

    def build(self, name: str, /, *context: Any, **options: Any) -> Any:
        """``factory(*context, **options)`` with the options checked and converted first.

        The context arguments may also be given by keyword (``num_classes=3``); they are not options.
        """
        context_keywords = {key: options.pop(key) for key in self.context if key in options}
        checked = self.check_options(name, options)
        return self.get(name)(*context, **context_keywords, **checked)  # type: ignore[operator]

    def names(self) -> list[str]:
        self._populate()
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        self._populate()
        return name in self._factories


def import_submodules(package: str, path: Iterable[str]) -> None:
    """Import every module of ``package`` found on ``path`` (its ``__path__``): each file registers itself."""
    for module in pkgutil.iter_modules(list(path)):
        importlib.import_module(f"{package}.{module.name}")


BACKBONES: Registry[Callable[..., Any]] = Registry("architecture", "dmlkd.models.registered")
DATASETS: Registry[Callable[..., Any]] = Registry("dataset", "dmlkd.data.catalog", context=("root",))
TEACHER_LOSSES: Registry[Callable[..., Any]] = Registry(
    "loss", "dmlkd.teacher.losses", context=("num_classes", "embedding_dim")
)
TRANSFER_METHODS: Registry[Callable[..., Any]] = Registry(
    "transfer method", "dmlkd.transfer.methods", context=("context",)
)
