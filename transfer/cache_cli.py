"""``dmlkd cache ls`` and ``dmlkd cache clean``: list and remove teacher-output caches.

Caches live in ``<dmlkd cache folder>/teacher-outputs`` (``$DMLKD_CACHE``, else ``~/.cache/dmlkd``) unless a
run set ``teacher.cache_dir``; ``--dir`` points at another folder. A cache is only ever an optimisation: a
removed cache is rebuilt by the next ``transfer train`` that needs it. Leftover temporary files of an
interrupted build (``.teacher-*.tmp-*``) are listed and removed too.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import click

from dmlkd.errors import ConfigError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``2w`` or ``45s`` in seconds; anything else is a ``ConfigError``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not match:
        raise ConfigError(f"--older-than {text!r} is not a duration; use a number and s, m, h, d or w, e.g. 30d or 12h")
    return float(match.group(1)) * _UNITS[match.group(2)]


def default_cache_dir() -> Path:
    from dmlkd.data.glyphs import cache_folder

    return Path(cache_folder()) / "teacher-outputs"


def _human(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def _age(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f}{unit}"
    return f"{seconds:.0f}s"


def list_caches(folder: Path) -> list[dict[str, Any]]:
    """One entry per cache file (and leftover temporary file) in ``folder``, oldest first."""
    from dmlkd.errors import DataError
    from dmlkd.transfer.cache import describe_cache

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


@click.command("ls")
@click.option("--dir", "folder", default=None, help="Cache folder (default: $DMLKD_CACHE/teacher-outputs).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def cache_ls_command(folder: str | None, as_json: bool) -> None:
    """List the teacher caches: size, age, mode, images x views x dim and teacher digest."""
    where = Path(folder) if folder else default_cache_dir()
    entries = list_caches(where)
    if as_json:
        click.echo(json.dumps({"folder": str(where), "caches": entries}, indent=2))
        return
    if not entries:
        click.echo(f"no teacher caches in {where}")
        return
    click.echo(f"{'size':>9}  {'age':>5}  {'mode':<7} {'images x views x dim':<22} {'teacher':<12}  file")
    for entry in entries:
        shape = (
            f"{entry['num_images']} x {entry['num_sets']} x {entry['embedding_dim']}" if entry["status"] == "ok" else ""
        )
        mode = entry.get("mode") or entry["status"]
        teacher = (entry.get("teacher_digest") or "")[:12]
        name = Path(entry["path"]).name
        click.echo(
            f"{_human(entry['bytes']):>9}  {_age(entry['age_seconds']):>5}  {mode:<7} {shape:<22} {teacher:<12}  {name}"
        )
    total = sum(entry["bytes"] for entry in entries)
    click.echo(f"{len(entries)} file(s), {_human(total)} in {where}")


@click.command("clean")
@click.option("--dir", "folder", default=None, help="Cache folder (default: $DMLKD_CACHE/teacher-outputs).")
@click.option("--older-than", default=None, metavar="AGE", help="Only caches last written before AGE ago (30d, 12h).")
@click.option("--all", "everything", is_flag=True, help="Remove every cache (needed when --older-than is not given).")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
def cache_clean_command(folder: str | None, older_than: str | None, everything: bool, dry_run: bool) -> None:
    """Remove teacher caches (rebuilt on demand by the next run that needs them).

    \b
    Examples:
      dmlkd cache clean --older-than 30d
      dmlkd cache clean --all --dry-run
    """
    if older_than is None and not everything:
        raise ConfigError("cache clean needs --older-than AGE (e.g. 30d) or --all")
    limit = parse_age(older_than) if older_than is not None else 0.0
    where = Path(folder) if folder else default_cache_dir()
    chosen = [entry for entry in list_caches(where) if entry["age_seconds"] >= limit]
    freed = 0
    for entry in chosen:
        if not dry_run:
            Path(entry["path"]).unlink(missing_ok=True)
        freed += entry["bytes"]
        click.echo(f"{'would remove' if dry_run else 'removed'} {entry['path']} ({_human(entry['bytes'])})")
    verb = "would free" if dry_run else "freed"
    click.echo(f"{len(chosen)} file(s), {verb} {_human(freed)} in {where}")
