"""User-facing errors.

Every error a user can cause (a bad name, a missing folder, a corrupt file) is raised as a ``DmlkdError``
whose message is one readable line naming the bad value and what would be valid. The CLI prints that line
and exits with status 2 instead of showing a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# torch re-raises an error from a DataLoader worker as ``type(error)(text)`` where text is
# "Caught DataError in DataLoader worker process 0.\nOriginal Traceback ...\nmodule.DataError: <message>".
_WORKER_TRACEBACK = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback", re.ASCII)


class DmlkdError(Exception):
    """Base class of errors caused by user input; ``str(error)`` is a complete one-line explanation.

    Re-raised from a DataLoader worker, the error keeps its own line rather than the worker's traceback.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str) and _WORKER_TRACEBACK.match(args[0]):
            last = [line for line in args[0].splitlines() if line.strip()][-1]
            args = (re.sub(r"^[\w.]+Error: ", "", last, count=1),)
        super().__init__(*args)


class ConfigError(DmlkdError):
    """An option, recipe or ``--set`` override is invalid."""


class DataError(DmlkdError):
    """A dataset folder, annotation file or image is missing, malformed or inconsistent."""


class CheckpointError(DmlkdError):
    """A checkpoint folder is missing, incomplete, tampered with or does not fit the model."""


class ModelSpecError(DmlkdError):
    """A model specification such as ``resnet50-512`` cannot be parsed or names an unknown architecture."""


def choices(names: Iterable[str]) -> str:
    """Format valid choices for an error message: ``a, b, c``."""
    return ", ".join(sorted(names))


class Interrupted(Exception):  # noqa: N818 - a control-flow signal, not an error
    """A training run was stopped by SIGINT/SIGTERM after saving a resumable state."""

    def __init__(self, signum: int, step: int, where: str = "") -> None:
        super().__init__(f"interrupted by signal {signum} at step {step}")
        self.signum = signum
        self.step = step
        self.where = where
