"""The run folder's lock: one process per folder, and the refusal that names the process holding it.

``RunLock.acquire`` takes an exclusive ``flock`` on ``<folder>/.lock``, held until the run ends; the file records
the holder (pid, host, start time) for the refusal message. The operating system drops the lock of a process that
dies, so a stale lock is simply taken over. This module is torch-free.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path
from typing import Any

from dmlkd.engine.writable import probe_writable
from dmlkd.errors import ConfigError

LOCK_FILE = ".lock"


def _check_writable(run_dir: Path) -> None:
    try:
        probe_writable(run_dir)
    except OSError as error:
        raise ConfigError(f"output folder {str(run_dir)!r} is not writable: {error.strerror}") from None


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
