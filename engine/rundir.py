"""Run folders: creation, the overwrite/resume rules, and the saved resolved config.

A run folder holds ``run.json`` (stage, status, dmlkd version, command line), ``run_config.json`` (the
resolved config), ``metrics.jsonl``, ``last/`` and ``best/`` checkpoints, ``state/`` (resumable). Rules:
a new run needs an empty or absent folder; ``--resume`` needs a folder holding a run of the same stage;
``--overwrite`` replaces a folder holding a dmlkd run; a folder with other content is never touched. A run
that failed before writing any checkpoint or state (a bad option found during set-up, say) is marked
``failed`` and holds nothing to lose, so the corrected command may reuse its folder without ``--overwrite``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dmlkd import __version__
from dmlkd.errors import ConfigError, Interrupted

RUN_FILE = "run.json"
CONFIG_FILE = "run_config.json"
_PROGRESS_CONTENT = ("last", "best", "state")  # what a failed run may hold that a user would lose
_RUN_CONTENT = {
    RUN_FILE,
    CONFIG_FILE,
    "metrics.jsonl",
    "last",
    "best",
    "state",
    "cache",
    "report.md",
    "results.json",
}


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_run(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"{str(path)!r} is corrupt (not JSON); use another --out or delete the folder") from None


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ConfigError(f"output folder {str(run_dir)!r} is not writable: {error.strerror}") from None


def prepare_run_dir(
    run_dir: str | Path, stage: str, config_tree: dict[str, Any], *, resume: bool, overwrite: bool
) -> tuple[Path, dict[str, Any]]:
    """Validate and prepare ``run_dir``; returns the folder and the config tree to use.

    On ``resume`` the saved config is returned; ``config_tree`` must not contradict it.
    """
    run_dir = Path(run_dir)
    existing = read_run(run_dir)
    if resume:
        if existing is None:
            raise ConfigError(
                f"--resume: {str(run_dir)!r} holds no dmlkd run (no {RUN_FILE}); start a new run without --resume"
            )
        if existing.get("stage") != stage:
            raise ConfigError(f"--resume: {str(run_dir)!r} holds a {existing.get('stage')} run, not a {stage} run")
        saved = json.loads((run_dir / CONFIG_FILE).read_text())
        _check_same(saved, config_tree, run_dir)
        _check_writable(run_dir)
        return run_dir, saved
    if existing is not None:
        if not overwrite and not failed_without_progress(run_dir, existing):
            raise ConfigError(
                f"output folder {str(run_dir)!r} already holds a {existing.get('stage')} run; "
                "pass --resume to continue it or --overwrite to replace it"
            )
        _clear_run(run_dir)
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"output folder {str(run_dir)!r} is not empty and holds no dmlkd run; choose an empty or new --out folder"
        )
    _check_writable(run_dir)
    _write_json(run_dir / CONFIG_FILE, config_tree)
    _write_json(
        run_dir / RUN_FILE,
        {"stage": stage, "status": "running", "dmlkd_version": __version__, "command": sys.argv},
    )
    return run_dir, config_tree


def _check_same(saved: dict[str, Any], given: dict[str, Any], run_dir: Path, prefix: str = "") -> None:
    for key, value in given.items():
        if key not in saved:
            continue
        if isinstance(value, dict) and isinstance(saved[key], dict):
            _check_same(saved[key], value, run_dir, f"{prefix}{key}.")
        elif saved[key] != value:
            raise ConfigError(
                f"--resume: {prefix}{key}={json.dumps(value)} differs from the saved run's "
                f"{json.dumps(saved[key])} in {str(run_dir)!r}; resume with the same options or --overwrite"
            )


def failed_without_progress(run_dir: Path, record: dict[str, Any]) -> bool:
    return record.get("status") == "failed" and not any((run_dir / name).exists() for name in _PROGRESS_CONTENT)


@contextmanager
def failure_recorded(run_dir: Path, is_main: Callable[[], bool] = lambda: True) -> Iterator[None]:
    """Mark the run ``failed`` (with the error's text) when the body raises; an interruption is not a failure.

    ``is_main`` is asked when the error happens (the process group may start inside the body).
    """
    try:
        yield
    except Interrupted:
        raise
    except Exception as error:
        if is_main() and (Path(run_dir) / RUN_FILE).is_file():
            mark_status(run_dir, "failed", error=str(error).splitlines()[0] if str(error) else type(error).__name__)
        raise


def _clear_run(run_dir: Path) -> None:
    for child in run_dir.iterdir():
        if child.name not in _RUN_CONTENT:
            continue
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def mark_status(run_dir: Path, status: str, **fields: Any) -> None:
    record = read_run(run_dir) or {}
    if status != "failed":
        record.pop("error", None)  # a resumed run that finishes is no longer failed
    record.update({"status": status, **fields})
    _write_json(Path(run_dir) / RUN_FILE, record)
