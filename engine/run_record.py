"""``run.json``, the record of a run: its stage, status, dmlkd version and command line, and how it ended.

Every ending is recorded: ``finished``, ``failed`` (with the error line) or ``interrupted`` (Ctrl-C, SIGTERM). A run
that was killed outright still says ``running``; the next command sees that no process holds its lock and treats
it as interrupted. This module is torch-free.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dmlkd.jsondata as jsondata
from dmlkd.errors import ConfigError, Interrupted

RUN_FILE = "run.json"
CONFIG_FILE = "run_config.json"


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON through a temporary file renamed into place."""
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
    write_json(Path(run_dir) / RUN_FILE, record)


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
            mark_status(run_dir, "failed", error=first_line(error))
        raise


def first_line(error: BaseException) -> str:
    """The error's first line (its type's name when it has no text): what ``run.json`` records of a failure."""
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__


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
