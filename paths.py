"""Files on disk every layer needs: the dmlkd cache folder and a file's SHA-256 digest.

The cache folder is shared by the glyph renders, the teacher-output caches and timm downloads; the digest pins
checkpoint files, timm weights and the images a teacher cache was built from. Torch-free and dependency-free,
so every layer can ask for them.
"""

from __future__ import annotations

import hashlib
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


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB blocks so a large file never sits in memory whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
