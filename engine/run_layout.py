"""What a run folder holds, and moving a run aside and back (``--overwrite`` never destroys before success).

The previous run's files are moved into ``.previous-*`` inside the folder; they are deleted once the new run has
written its first checkpoint or state, and moved back if it ends before that. Leftovers of interrupted writes
(``.*.tmp-*``) are removed. This module is torch-free.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from dmlkd.engine.run_lock import LOCK_FILE
from dmlkd.engine.run_record import CONFIG_FILE, RUN_FILE, read_run
from dmlkd.engine.writable import WRITE_TEST_PREFIX

PREVIOUS_PREFIX = ".previous-"
_PROGRESS_CONTENT = ("last", "best", "state")  # what a run holds that a user would lose
RUN_CONTENT = {
    RUN_FILE,
    CONFIG_FILE,
    "metrics.jsonl",
    "steps.jsonl",
    "last",
    "best",
    "state",
    "cache",
    "report.md",
    "results.json",
}


def has_progress(run_dir: Path) -> bool:
    return any((Path(run_dir) / name).exists() for name in _PROGRESS_CONTENT)


def own_entries(run_dir: Path) -> list[Path]:
    hidden = (LOCK_FILE, WRITE_TEST_PREFIX)
    return [child for child in run_dir.iterdir() if not child.name.startswith(hidden)]


def failed_without_progress(run_dir: Path, record: dict[str, Any]) -> bool:
    return record.get("status") == "failed" and not has_progress(run_dir)


def set_aside(run_dir: Path, overwrite: bool) -> Path | None:
    """Make room for a new run; an overwritten run is moved into ``.previous-*`` (not deleted yet)."""
    existing = read_run(run_dir)
    if existing is None:
        return None
    if not overwrite:  # a failed run without progress: nothing to keep
        _delete_entries(run_dir, RUN_CONTENT)
        return None
    return move_aside(run_dir, RUN_CONTENT)


def _delete_entries(folder: Path, content: set[str] | frozenset[str]) -> None:
    for child in own_entries(folder):
        if child.name in content:
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def move_aside(folder: Path, content: set[str] | frozenset[str]) -> Path:
    """Move the entries of ``folder`` named in ``content`` into ``folder/.previous-<pid>`` (one rename each)."""
    previous = folder / f"{PREVIOUS_PREFIX}{os.getpid()}"
    previous.mkdir()
    for child in own_entries(folder):
        if child.name in content:
            os.replace(child, previous / child.name)
    return previous


def restore_previous(
    run_dir: Path, previous: Path, content: set[str] | frozenset[str] = frozenset(RUN_CONTENT)
) -> None:
    """Put an overwritten run back: the new run's files go, the previous run's come back."""
    _delete_entries(run_dir, content)
    for child in previous.iterdir():
        os.replace(child, run_dir / child.name)
    previous.rmdir()


def recover_previous(run_dir: Path) -> None:
    """A process killed during ``--overwrite``: keep the new run if it has progress, else the previous one."""
    for previous in sorted(run_dir.glob(f"{PREVIOUS_PREFIX}*")):
        if has_progress(run_dir):
            shutil.rmtree(previous, ignore_errors=True)
        else:
            restore_previous(run_dir, previous)


def remove_leftovers(run_dir: Path) -> None:
    """Temporary files and folders of writes cut short (checkpoints, states, JSON files)."""
    for leftover in [*run_dir.glob(".*.tmp-*"), *run_dir.glob(".*.tmp"), *run_dir.glob(f"{WRITE_TEST_PREFIX}*")]:
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
