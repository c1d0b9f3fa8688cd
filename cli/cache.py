"""``dmlkd cache build|ls|clean``: build the teacher cache a transfer run would use, list and remove caches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from dmlkd.cli.app import main
from dmlkd.cli.options import print_resolved
from dmlkd.cli.transfer import resolve_command_config, transfer_options
from dmlkd.errors import ConfigError


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


@main.group("cache")
def cache_group() -> None:
    """Teacher-output caches for the transfer stage."""


@cache_group.command("build")
@transfer_options(
    "The method the cache is for (decides whether pooled features are stored); default relaxed_contrastive."
)
def cache_build_command(config_file: str | None, print_config: bool, overrides: tuple[str, ...], **params: Any) -> None:
    """Build (or verify) the teacher cache a `transfer train` with the same options would use.

    Example: dmlkd cache build --teacher runs/cub-r50 --dataset cub --data-root data --cache-views 8
    """
    config, _given, _notes = resolve_command_config(params, config_file, overrides)
    if print_config:
        print_resolved(config, "transfer")
        return

    from dmlkd.transfer.trainer import build_cache_for

    click.echo(json.dumps(build_cache_for(config), indent=2))


@cache_group.command("ls")
@click.option("--dir", "folder", default=None, help="Cache folder (default: $DMLKD_CACHE/teacher-outputs).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def cache_ls_command(folder: str | None, as_json: bool) -> None:
    """List the teacher caches: size, age, mode, images x views x dim and teacher digest."""
    from dmlkd.transfer.cache.admin import default_cache_dir, list_caches

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


@cache_group.command("clean")
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
    from dmlkd.transfer.cache.admin import default_cache_dir, list_caches, parse_age

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
