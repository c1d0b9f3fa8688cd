"""``pipeline.json`` and the pipeline folder's lifecycle (torch-free).

The pipeline folder is locked for the whole run (``RunLock``). It records the pipeline's config and which
steps have finished; rerunning the same command skips finished steps and resumes an interrupted one, and
a finished pipeline rerun says "nothing to do" (``finished_results``). A different command is refused
unless ``--overwrite``, which moves the old pipeline aside (``.previous-*``) and deletes it only when the new
run has saved its first state or checkpoint; a new run that ends before that brings the old one back.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from dmlkd.config.convert import from_dict, to_dict
from dmlkd.engine.run_layout import PREVIOUS_PREFIX, move_aside, restore_previous
from dmlkd.engine.run_lock import RunLock
from dmlkd.errors import ConfigError
from dmlkd.pipelines.config import CONFIG_FLAGS, current_keys
from dmlkd.version import __version__

STATE_FILE = "pipeline.json"
PIPELINE_CONTENT = frozenset(
    {
        STATE_FILE,
        "teacher",
        "students",
        "exports",
        "report.md",
        "results.json",
        "recall_per_epoch.png",
        "recall_at_k.png",
        "retrieval_grid.png",
    }
)
FINAL_STEP = "report"  # pipeline.json before format 3 called the steps "stages"; such a folder is read as today


def _read_state(out: Path) -> dict[str, Any] | None:
    path = Path(out) / STATE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{str(path)!r} is corrupt (not JSON); use another --out or --overwrite") from None
    if isinstance(record, dict) and "steps" not in record and "stages" in record:
        record["steps"] = record.pop("stages")
    if not isinstance(record, dict) or not isinstance(record.get("steps"), dict):
        raise ConfigError(f"{str(path)!r} is not a dmlkd pipeline record; use another --out or --overwrite")
    return record


def _saved_config(record: dict[str, Any], config: Any) -> dict[str, Any]:
    """The config saved in ``pipeline.json`` as this version reads it: a field added since is its default.

    A folder written by an older dmlkd compares equal to the same command today; a tree this version
    cannot read (a newer dmlkd's fields) is compared as it is, so it differs.
    """
    saved = current_keys(record.get("config", {}))
    try:
        return to_dict(from_dict(type(config), saved))
    except (ConfigError, TypeError, ValueError):
        return saved


def finished_results(out: Path, config: Any) -> dict[str, Any] | None:
    """The results of a finished pipeline in ``out`` run with exactly ``config``, else None."""
    record = _read_state(out)
    if record is None or _saved_config(record, config) != to_dict(config) or FINAL_STEP not in record["steps"]:
        return None
    try:
        return json.loads((Path(out) / "results.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _first_difference(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    for key in sorted(set(old) | set(new)):
        if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
            found = _first_difference(old[key], new[key], f"{prefix}{key}.")
            if found:
                return found
        elif old.get(key) != new.get(key):
            name = f"{prefix}{key}" + (f" ({CONFIG_FLAGS[key]})" if not prefix and key in CONFIG_FLAGS else "")
            return f"{name}: {json.dumps(old.get(key))} before, {json.dumps(new.get(key))} now"
    return ""


class PipelineState:
    """``pipeline.json``: the pipeline's config and which steps have finished; holds the folder's lock."""

    def __init__(self, out: Path, record: dict[str, Any], lock: RunLock | None, previous: Path | None) -> None:
        self.out = out
        self.record = record
        self.lock = lock
        self.previous = previous

    @classmethod
    def open(cls, out: Path, config: Any, overwrite: bool) -> PipelineState:
        out = Path(out)
        wanted = to_dict(config)
        if out.is_dir() and not (out / STATE_FILE).is_file():
            foreign = [c for c in out.iterdir() if not c.name.startswith((".lock", PREVIOUS_PREFIX))]
            if foreign:
                raise ConfigError(
                    f"output folder {str(out)!r} is not empty and holds no dmlkd pipeline; "
                    "choose an empty or new --out folder"
                )
        lock = RunLock.acquire(out, "pipeline folder")
        try:
            _recover(out)
            record = _read_state(out)
            previous = None
            if record is not None:
                saved = _saved_config(record, config)
                if saved == wanted and not overwrite:
                    record.update(format=3, config=wanted)  # an older record is rewritten in today's format
                    return cls(out, record, lock, None)
                if not overwrite:
                    difference = _first_difference(saved, wanted)
                    raise ConfigError(
                        f"{str(out)!r} holds a pipeline run with different options ({difference}); "
                        "rerun the same command to resume it, or pass --overwrite to replace it"
                    )
                previous = move_aside(out, PIPELINE_CONTENT)
            record = {"format": 3, "dmlkd_version": __version__, "config": wanted, "steps": {}}
            state = cls(out, record, lock, previous)
            state.save()
            return state
        except BaseException:
            lock.release()
            raise

    def save(self) -> None:
        from dmlkd.engine.distributed import is_main

        if not is_main():  # every process keeps the record in memory; the main process writes it
            return
        tmp = self.out / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(self.record, indent=2) + "\n")
        os.replace(tmp, self.out / STATE_FILE)

    def saved(self) -> None:
        """The new run wrote its first state or checkpoint: an overwritten pipeline is deleted now."""
        if self.previous is not None:
            shutil.rmtree(self.previous, ignore_errors=True)
            self.previous = None

    def close(self) -> None:
        """Release the lock; an overwritten pipeline comes back if the new run saved nothing."""
        try:
            if self.previous is not None:
                if _has_progress(self.out):
                    self.saved()
                else:
                    restore_previous(self.out, self.previous, PIPELINE_CONTENT)
                    self.previous = None
        finally:
            if self.lock is not None:
                self.lock.release()

    def done(self, step: str) -> dict[str, Any] | None:
        return self.record["steps"].get(step)

    def finish(self, step: str, **info: Any) -> None:
        self.record["steps"][step] = {"status": "done", **info}
        self.save()


def _has_progress(out: Path) -> bool:
    return (
        any(Path(out).glob("teacher/*/model.safetensors"))
        or any(Path(out).glob("teacher/state"))
        or any(Path(out).glob("students/*/state"))
    )


def _recover(out: Path) -> None:
    """A process killed during ``--overwrite``: keep the new pipeline if it saved anything, else the old one."""
    for previous in sorted(out.glob(f"{PREVIOUS_PREFIX}*")):
        if _has_progress(out):
            shutil.rmtree(previous, ignore_errors=True)
        else:
            restore_previous(out, previous, PIPELINE_CONTENT)
