"""Run folders: the one owner of their lifecycle (lock, overwrite, resume, status).

A run folder holds ``run.json`` (stage, status, dmlkd version, command line, how the run ended),
``run_config.json`` (the resolved config), ``metrics.jsonl``, ``last/`` and ``best/`` checkpoints and
``state/`` (resumable). The rules, all enforced here:

- **One process per folder.** ``RunFolder.open`` takes an exclusive lock (``.lock``, ``flock``) held until
  the run ends; a second process is refused with one line naming the holder (pid, host, start time). The
  operating system drops the lock of a process that dies, so a stale lock is simply taken over.
- **A new run** needs an empty or absent folder, or one holding a run that failed before writing anything.
- **``--overwrite`` never destroys before success.** The previous run's files are moved aside into
  ``.previous-*`` inside the folder; they are deleted once the new run has written its first checkpoint or
  state, and moved back if it ends (fails, is interrupted, is killed) before that.
- **``--resume``** needs a run of the same stage; options that change results must equal the saved ones,
  while settings that do not (``RUNTIME_KEYS``: progress bars, data-loader workers) may differ and apply to
  the resumed process only. Leftovers of interrupted writes (``.*.tmp-*``) are removed.
- **Every ending is recorded** in ``run.json``: ``finished``, ``failed`` (with the error line) or
  ``interrupted`` (Ctrl-C, SIGTERM). A run that was killed outright still says ``running``; the next command
  sees that no process holds its lock and treats it as interrupted.

Parts: ``run_lock`` (the lock), ``run_record`` (``run.json``), ``run_layout`` (what a folder holds, moving a run
aside and back); this module opens and closes a run folder and holds every check of whether it may be opened.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dmlkd.config.files import read_json
from dmlkd.engine.run_layout import (
    PREVIOUS_PREFIX,
    failed_without_progress,
    has_progress,
    own_entries,
    recover_previous,
    remove_leftovers,
    restore_previous,
    set_aside,
)
from dmlkd.engine.run_lock import RunLock
from dmlkd.engine.run_record import CONFIG_FILE, RUN_FILE, first_line, is_complete, mark_status, read_run, write_json
from dmlkd.errors import ConfigError, Interrupted
from dmlkd.version import __version__

# Settings that never change what a run computes: they may differ on --resume (the new value applies).
RUNTIME_KEYS = frozenset(
    {
        "train.progress",
        "train.num_workers",
        "eval.num_workers",
        "train.log_every",
        "train.keep_state",
        "train.report_to",
    }
)


# ------------------------------------------------------------------------------------------ the run folder


class RunFolder:
    """An opened run folder: locked, its config resolved; ``close`` records how the run ended."""

    def __init__(self, path: Path, stage: str, tree: dict[str, Any], lock: RunLock, previous: Path | None) -> None:
        self.path = path
        self.stage = stage
        self.tree = tree
        self.lock = lock
        self.previous = previous

    @classmethod
    def open(
        cls,
        run_dir: str | Path,
        stage: str,
        config_tree: dict[str, Any],
        *,
        resume: bool,
        overwrite: bool,
        given: dict[str, Any] | None = None,
    ) -> RunFolder:
        """Lock ``run_dir`` and prepare it for a new or resumed run of ``stage``.

        ``config_tree`` is the resolved config of a new run; on ``resume`` the saved config is used and
        ``given`` (the options given on this command line) must not contradict it outside ``RUNTIME_KEYS``.
        """
        run_dir = Path(run_dir)
        if resume and overwrite:
            raise ConfigError(
                "--resume and --overwrite contradict each other: --resume continues the run in --out, "
                "--overwrite replaces it; pass one of them"
            )
        # Refusals are decided read-only first, so a refused command changes nothing (not even the lock file);
        # they are decided again under the lock, which a concurrent process may hold. An overwrite cut short
        # (``.previous-*``) is settled under the lock first, so the checks see the run that is kept.
        if not any(run_dir.glob(f"{PREVIOUS_PREFIX}*")):
            _check_allowed(run_dir, stage, resume, overwrite, given or {})
        lock = RunLock.acquire(run_dir)
        try:
            recover_previous(run_dir)
            remove_leftovers(run_dir)
            _check_allowed(run_dir, stage, resume, overwrite, given or {})
            if resume:
                tree = _open_resumed(run_dir, stage, given or {})
                return cls(run_dir, stage, tree, lock, None)
            previous = set_aside(run_dir, overwrite)
            write_json(run_dir / CONFIG_FILE, config_tree)
            write_json(
                run_dir / RUN_FILE,
                {"stage": stage, "status": "running", "dmlkd_version": __version__, "command": sys.argv},
            )
            return cls(run_dir, stage, config_tree, lock, previous)
        except BaseException:
            lock.release()
            raise

    def saved(self) -> None:
        """The run wrote a checkpoint or state: the run it replaced (``--overwrite``) is deleted now."""
        if self.previous is not None:
            shutil.rmtree(self.previous, ignore_errors=True)
            self.previous = None

    def close(self, status: str | None = None, **fields: Any) -> None:
        """Record ``status`` (unless None), settle an overwritten previous run, release the lock."""
        try:
            if status is not None:
                mark_status(self.path, status, **fields)
            if self.previous is not None:
                if has_progress(self.path):
                    self.saved()
                else:
                    restore_previous(self.path, self.previous)
                    self.previous = None
        finally:
            self.lock.release()

    @contextmanager
    def active(self) -> Iterator[RunFolder]:
        """Record how the body ends (failed / interrupted); a body that returns has marked ``finished`` itself."""
        try:
            yield self
        except Interrupted as stop:
            self.close("interrupted", stopped_at_step=stop.step)
            raise
        except KeyboardInterrupt:
            self.close("interrupted")
            raise
        except Exception as error:
            self.close("failed", error=first_line(error))
            raise
        else:
            self.close()


def _refuse_foreign_content(run_dir: Path) -> None:
    if run_dir.is_dir() and read_run(run_dir) is None:
        foreign = [c for c in own_entries(run_dir) if not c.name.startswith((PREVIOUS_PREFIX, ".run.json"))]
        if foreign:
            raise ConfigError(
                f"output folder {str(run_dir)!r} is not empty and holds no dmlkd run; "
                "choose an empty or new --out folder"
            )


def check_can_open(run_dir: str | Path, stage: str, *, resume: bool, overwrite: bool, given: dict[str, Any]) -> None:
    """Read-only: the refusal ``RunFolder.open`` would give (a folder holding another run, ...), if any.

    Called before a new run is validated, so that a folder that cannot be used is named first.
    """
    if not any(Path(run_dir).glob(f"{PREVIOUS_PREFIX}*")):
        _check_allowed(Path(run_dir), stage, resume, overwrite, given)


def _check_allowed(run_dir: Path, stage: str, resume: bool, overwrite: bool, given: dict[str, Any]) -> None:
    """Every reason to refuse opening ``run_dir``, checked without writing anything."""
    if not resume:
        _refuse_foreign_content(run_dir)
        existing = read_run(run_dir) if run_dir.is_dir() else None
        if existing is not None and not overwrite and not failed_without_progress(run_dir, existing):
            status = existing.get("status")
            state = f" ({status})" if status not in (None, "finished") else ""
            raise ConfigError(
                f"output folder {str(run_dir)!r} already holds a {existing.get('stage')} run{state}; "
                "pass --resume to continue it or --overwrite to replace it"
            )
        return
    existing = read_run(run_dir) if run_dir.is_dir() else None
    if existing is None:
        raise ConfigError(
            f"--resume: {str(run_dir)!r} holds no dmlkd run (no {RUN_FILE}); start a new run without --resume"
        )
    if existing.get("stage") != stage:
        raise ConfigError(f"--resume: {str(run_dir)!r} holds a {existing.get('stage')} run, not a {stage} run")
    from dmlkd.engine.state import check_resumable  # run_config.json and state/ validated as data

    check_resumable(run_dir, stage)
    check_same(read_json(run_dir / CONFIG_FILE), given, run_dir)


def _open_resumed(run_dir: Path, stage: str, given: dict[str, Any]) -> dict[str, Any]:

    existing = read_run(run_dir) or {}
    saved = read_json(run_dir / CONFIG_FILE)
    if not is_complete(run_dir):  # a finished run whose state was dropped has nothing left to do
        mark_status(run_dir, "running", resumed=int(existing.get("resumed", 0)) + 1)
    return apply_runtime(saved, given)


def check_same(saved: dict[str, Any], given: dict[str, Any], run_dir: Path, prefix: str = "") -> None:
    """``given`` options that contradict the saved config (outside ``RUNTIME_KEYS``) are a ``ConfigError``."""
    for key, value in given.items():
        name = f"{prefix}{key}"
        if key not in saved or name in RUNTIME_KEYS:
            continue
        if isinstance(value, dict) and isinstance(saved[key], dict):
            check_same(saved[key], value, run_dir, f"{name}.")
        elif saved[key] != value:
            raise ConfigError(
                f"--resume: {name}={json.dumps(value)} differs from the saved run's "
                f"{json.dumps(saved[key])} in {str(run_dir)!r}; resume with the same options or --overwrite"
            )


def apply_runtime(saved: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The saved config with this command's runtime settings (``RUNTIME_KEYS``) applied."""
    tree = json.loads(json.dumps(saved))
    for dotted in RUNTIME_KEYS:
        section, key = dotted.split(".")
        value = given.get(section, {}).get(key) if isinstance(given.get(section), dict) else None
        if value is not None and isinstance(tree.get(section), dict):
            tree[section][key] = value
    return tree


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Outside the training loop (which handles SIGTERM itself), SIGTERM ends the command like Ctrl-C."""
    import signal

    def handler(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
