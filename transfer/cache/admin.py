"""Listing and ageing the teacher-output caches on disk (what ``dmlkd cache ls|clean`` shows and removes).

Caches live in ``<dmlkd cache folder>/teacher-outputs`` (``$DMLKD_CACHE``, else ``~/.cache/dmlkd``) unless a
run set ``teacher.cache_dir``. A cache is only ever an optimisation: a removed cache is rebuilt by the next
``transfer train`` that needs it. Leftover temporary files of an interrupted build (``.teacher-*.tmp-*``) are
listed too.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from dmlkd.errors import ConfigError, DataError
from dmlkd.paths import cache_folder
from dmlkd.transfer.cache.teacher_cache import describe_cache

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``2w`` or ``45s`` in seconds; anything else is a ``ConfigError``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not match:
        raise ConfigError(f"--older-than {text!r} is not a duration; use a number and s, m, h, d or w, e.g. 30d or 12h")
    return float(match.group(1)) * _UNITS[match.group(2)]


def default_cache_dir() -> Path:
    return Path(cache_folder()) / "teacher-outputs"


def list_caches(folder: Path) -> list[dict[str, Any]]:
    """One entry per cache file (and leftover temporary file) in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    entries, now = [], time.time()
    files = [*folder.glob("teacher-*.safetensors"), *folder.glob(".teacher-*.tmp*")]
    for path in sorted(files, key=lambda p: p.stat().st_mtime):
        stat = path.stat()
        entry: dict[str, Any] = {"path": str(path), "bytes": stat.st_size, "age_seconds": round(now - stat.st_mtime)}
        try:
            info = describe_cache(path)
        except DataError:
            entry["status"] = "leftover" if path.name.startswith(".") else "unreadable"
        else:
            entry["status"] = "ok"
            entry.update({key: info[key] for key in ("mode", "num_images", "num_sets", "embedding_dim", "created")})
            entry["teacher_digest"] = info.get("teacher_digest")
        entries.append(entry)
    return entries
