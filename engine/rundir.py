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
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dmlkd.jsondata as jsondata
from dmlkd.config import read_json
from dmlkd.errors import ConfigError, Interrupted
from dmlkd.version import __version__

RUN_FILE = "run.json"
CONFIG_FILE = "run_config.json"
LOCK_FILE = ".lock"
PREVIOUS_PREFIX = ".previous-"
_PROGRESS_CONTENT = ("last", "best", "state")  # what a run holds that a user would lose
_RUN_CONTENT = {
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


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_run(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = jsondata.loads(path.read_text(), repr(str(path)), ConfigError)
    except UnicodeDecodeError:
        raise ConfigError(f"{str(path)!r} is corrupt (not JSON); use another --out or delete the folder") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{str(path)!r} is corrupt (not a JSON object); use another --out or delete the folder")
    return record


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ConfigError(f"output folder {str(run_dir)!r} is not writable: {error.strerror}") from None


# ------------------------------------------------------------------------------------------------- the lock


def _in_use(folder: Path, what: str, holder: str) -> ConfigError:
    return ConfigError(
        f"{what} {str(folder)!r} is in use by {holder}; wait for that run to end or stop it, or choose another --out"
    )


def check_not_in_use(folder: str | Path, what: str = "run folder") -> None:
    """Read-only and torch-free: the refusal ``RunLock.acquire`` would give while another process holds the
    folder's lock, so a command refuses a busy folder before it loads the training code."""
    import fcntl

    path = Path(folder) / LOCK_FILE
    if not path.is_file():
        return
    with open(path) as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise _in_use(Path(folder), what, _describe_holder(handle.read())) from None
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class RunLock:
    """An exclusive ``flock`` on ``<folder>/.lock``; the file records the holder for the refusal message."""

    def __init__(self, path: Path, handle: Any) -> None:
        self.path = path
        self._handle = handle

    @classmethod
    def acquire(cls, folder: Path, what: str = "run folder") -> RunLock:
        import fcntl

        _check_writable(folder)
        path = folder / LOCK_FILE
        handle = open(path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = _describe_holder(handle.read())
            handle.close()
            raise _in_use(folder, what, holder) from None
        handle.seek(0)
        handle.truncate()
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}) + "\n")
        handle.flush()
        return cls(path, handle)

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor releases the flock
            self._handle = None


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"process {holder['pid']} on {holder['host']} (started {holder['started']})"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "another process"


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
            _recover_previous(run_dir)
            _remove_leftovers(run_dir)
            _check_allowed(run_dir, stage, resume, overwrite, given or {})
            if resume:
                tree = _open_resumed(run_dir, stage, given or {})
                return cls(run_dir, stage, tree, lock, None)
            previous = _set_aside(run_dir, overwrite)
            _write_json(run_dir / CONFIG_FILE, config_tree)
            _write_json(
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
                    _restore(self.path, self.previous)
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
            self.close("failed", error=_first_line(error))
            raise
        else:
            self.close()


def _first_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__


def has_progress(run_dir: Path) -> bool:
    return any((Path(run_dir) / name).exists() for name in _PROGRESS_CONTENT)


def _own_entries(run_dir: Path) -> list[Path]:
    hidden = (LOCK_FILE, ".write-test-")
    return [child for child in run_dir.iterdir() if not child.name.startswith(hidden)]


def _refuse_foreign_content(run_dir: Path) -> None:
    if run_dir.is_dir() and read_run(run_dir) is None:
        foreign = [c for c in _own_entries(run_dir) if not c.name.startswith((PREVIOUS_PREFIX, ".run.json"))]
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


def is_complete(run_dir: Path) -> bool:
    """A finished run that dropped its resumable state: ``--resume`` reports it and trains nothing."""
    record = read_run(run_dir) or {}
    return record.get("status") == "finished" and not (Path(run_dir) / "state").exists()


def drop_state(run_dir: Path) -> None:
    """A finished run no longer needs ``state/`` (``train.keep_state`` keeps it)."""
    state = Path(run_dir) / "state"
    if state.is_dir():
        shutil.rmtree(state)
        mark_status(run_dir, "finished", state_dropped=True)


def _set_aside(run_dir: Path, overwrite: bool) -> Path | None:
    """Make room for a new run; an overwritten run is moved into ``.previous-*`` (not deleted yet)."""
    existing = read_run(run_dir)
    if existing is None:
        return None
    if not overwrite:  # a failed run without progress: nothing to keep
        for child in _own_entries(run_dir):
            if child.name in _RUN_CONTENT:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        return None
    return move_aside(run_dir, _RUN_CONTENT)


def move_aside(folder: Path, content: set[str] | frozenset[str]) -> Path:
    """Move the entries of ``folder`` named in ``content`` into ``folder/.previous-<pid>`` (one rename each)."""
    previous = folder / f"{PREVIOUS_PREFIX}{os.getpid()}"
    previous.mkdir()
    for child in _own_entries(folder):
        if child.name in content:
            os.replace(child, previous / child.name)
    return previous


def _restore(run_dir: Path, previous: Path, content: set[str] | frozenset[str] = frozenset(_RUN_CONTENT)) -> None:
    """Put an overwritten run back: the new run's files go, the previous run's come back."""
    for child in _own_entries(run_dir):
        if child.name in content:
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    for child in previous.iterdir():
        os.replace(child, run_dir / child.name)
    previous.rmdir()


restore_previous = _restore


def _recover_previous(run_dir: Path) -> None:
    """A process killed during ``--overwrite``: keep the new run if it has progress, else the previous one."""
    for previous in sorted(run_dir.glob(f"{PREVIOUS_PREFIX}*")):
        if has_progress(run_dir):
            shutil.rmtree(previous, ignore_errors=True)
        else:
            _restore(run_dir, previous)


def _remove_leftovers(run_dir: Path) -> None:
    """Temporary files and folders of writes cut short (checkpoints, states, JSON files)."""
    for leftover in [*run_dir.glob(".*.tmp-*"), *run_dir.glob(".*.tmp"), *run_dir.glob(".write-test-*")]:
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


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


def failed_without_progress(run_dir: Path, record: dict[str, Any]) -> bool:
    return record.get("status") == "failed" and not has_progress(run_dir)


@contextmanager
def failure_recorded(run_dir: Path, is_main: Callable[[], bool] = lambda: True) -> Iterator[None]:
    """Mark the run ``failed`` (with the error's text) or ``interrupted`` when the body raises.

    ``is_main`` is asked when the error happens (the process group may start inside the body).
    """
    try:
        yield
    except Interrupted as stop:
        if is_main() and (Path(run_dir) / RUN_FILE).is_file():
            mark_status(run_dir, "interrupted", stopped_at_step=stop.step)
        raise
    except KeyboardInterrupt:
        if is_main() and (Path(run_dir) / RUN_FILE).is_file():
            mark_status(run_dir, "interrupted")
        raise
    except Exception as error:
        if is_main() and (Path(run_dir) / RUN_FILE).is_file():
            mark_status(run_dir, "failed", error=_first_line(error))
        raise


def mark_status(run_dir: Path, status: str, **fields: Any) -> None:
    record = read_run(run_dir) or {}
    if status != "failed":
        record.pop("error", None)  # a resumed run that finishes is no longer failed
    if status != "interrupted":
        record.pop("stopped_at_step", None)
    ended = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record.update({"status": status, **fields})
    if status != "running":
        record["ended"] = ended
    else:
        record.pop("ended", None)
    _write_json(Path(run_dir) / RUN_FILE, record)


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
