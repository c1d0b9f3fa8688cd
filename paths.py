"""The dmlkd cache folder on disk, shared by the glyph renders, the teacher-output caches and timm downloads.

Torch-free and dependency-free, so every layer can ask for it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_folder(root: str | Path | None = None) -> Path:
    """``root``, else ``$DMLKD_CACHE``, else ``$XDG_CACHE_HOME/dmlkd``, else ``~/.cache/dmlkd``."""
    if root is not None:
        return Path(root)
    if os.environ.get("DMLKD_CACHE"):
        return Path(os.environ["DMLKD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dmlkd"
