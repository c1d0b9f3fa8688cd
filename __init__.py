"""dmlkd: two-stage knowledge distillation for deep metric learning.

Stage 1 trains a teacher embedding (``dmlkd.teacher``); stage 2 transfers its embedding space to a compact
student (``dmlkd.transfer``). This module stays cheap to import: torch is only loaded when a function that
needs it is called.
"""

from __future__ import annotations

from typing import Any

from dmlkd.lazy import submodule
from dmlkd.version import __version__

__all__ = ["__version__", "load"]


def load(path: str, device: str = "cpu") -> Any:
    """Load a checkpoint or run folder and return the embedding model in eval mode.

    A run folder means its ``last/`` checkpoint (the final step); pass ``"RUN/best"`` for the one selected
    on the test split.

    Example:
        >>> model = dmlkd.load("runs/cub-r50")          # doctest: +SKIP
        >>> out = model(images)                          # images: (B, 3, H, W) RGB in [0, 1]
        >>> out.embedding.shape                          # (B, D)
    """
    from dmlkd.checkpoints.io import load_model

    return load_model(path, device=device)


def __getattr__(name: str) -> Any:
    # Subpackages load on first attribute access, so ``import dmlkd`` stays torch-free and
    # ``dmlkd.models.create_model(...)`` works without importing ``dmlkd.models`` first.
    return submodule(__name__, name)
