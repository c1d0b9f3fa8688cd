"""Resumable training state without pickle: tensors in safetensors, everything else in JSON.

``state/`` in a run folder holds the trainable module, the optimiser's per-parameter tensors and the RNG
states (``tensors.safetensors``) plus the step counters, scheduler, optimiser hyper-parameters and best metric
(``progress.json``). It is written atomically, like checkpoints, so a crash during a write leaves the previous
state loadable.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

import dmlkd.jsondata as jsondata
from dmlkd.checkpoints.folder import load_state_strict, save_tensor_file, write_folder_atomically
from dmlkd.config.convert import from_dict
from dmlkd.errors import CheckpointError, ConfigError
from dmlkd.paths import sha256_file
from dmlkd.teacher.config import TeacherConfig
from dmlkd.transfer.config import TransferConfig

TENSORS = "tensors.safetensors"
PROGRESS = "progress.json"


@dataclass
class Progress:
    """Where a run stands: ``epoch`` in progress and the optimiser steps already taken in it."""

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    finished: bool = False
    skipped_steps: int = 0  # steps skipped for a non-finite loss (train.on_nonfinite=skip)


def _optimizer_split(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{param_id}.{key}"] = value
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, param_id, key = name.split(".", 2)
            state.setdefault(int(param_id), {})[key] = value
    for param_id, entries in record["scalars"].items():
        state.setdefault(int(param_id), {}).update(entries)
    return {"state": state, "param_groups": record["param_groups"]}


def save_state(
    directory: Path,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the resumable state of a run to ``directory`` atomically."""
    optimizer_tensors, optimizer_record = _optimizer_split(optimizer)
    tensors = {f"module.{k}": v for k, v in module.state_dict().items()}
    tensors.update(optimizer_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for index, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = rng
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}

    def fill(tmp: Path) -> None:
        save_tensor_file(tensors, tmp / TENSORS)
        record = {
            "progress": asdict(progress),
            "optimizer": optimizer_record,
            "scheduler": scheduler.state_dict(),
            "extra": extra or {},
            "digest": sha256_file(tmp / TENSORS),
        }
        (tmp / PROGRESS).write_text(json.dumps(record, indent=2))

    write_folder_atomically(directory, fill)


def _complete(directory: Path) -> bool:
    return (directory / PROGRESS).is_file() and (directory / TENSORS).is_file()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile by another process of the run
        return 0.0


def has_state(directory: Path) -> bool:
    """Whether ``directory`` holds a resumable state; first repairs what a crash during a write left.

    ``write_folder_atomically`` fills ``.state.tmp-*``, renames the old ``state`` to ``.state.old-*`` and the
    new folder into place. A crash between the two renames leaves no ``state``: the old one is moved back.
    Temporary folders of interrupted writes and stale old copies are removed.
    """
    directory = Path(directory)
    olds = sorted(directory.parent.glob(f".{directory.name}.old-*"), key=_mtime)
    if not directory.exists():
        for old in reversed(olds):
            if _complete(old):
                with contextlib.suppress(OSError):  # another process of the run may have moved it already
                    os.replace(old, directory)
                break
    for leftover in [*directory.parent.glob(f".{directory.name}.tmp-*"), *olds]:
        shutil.rmtree(leftover, ignore_errors=True)
    return _complete(directory)


def enable_determinism(device: torch.device) -> None:
    """Make torch pick deterministic kernels (``train.deterministic``); raises on ops that have none.

    This sets process-wide flags; on a GPU it also fixes the cuBLAS workspace and turns cuDNN benchmarking off.
    """
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)


def load_state(
    directory: Path,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[Progress, dict[str, Any]]:
    """Restore module, optimiser, scheduler and RNG states saved by ``save_state``."""
    if not has_state(directory):
        raise CheckpointError(f"{str(directory)!r} holds no resumable state ({PROGRESS} and {TENSORS})")
    record = read_state_record(directory)
    tensors = load_file(str(directory / TENSORS))
    module_state = {k[len("module.") :]: v for k, v in tensors.items() if k.startswith("module.")}
    load_state_strict(module, module_state, f"resumable state {str(directory)!r}")
    try:
        optimizer.load_state_dict(_optimizer_join(tensors, record["optimizer"]))
        scheduler.load_state_dict(record["scheduler"])
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise CheckpointError(
            f"{str(directory / PROGRESS)!r}: the saved optimizer/scheduler state does not fit this run "
            f"({' '.join(str(error).split())}); resume with the options the run was started with, or --overwrite"
        ) from None
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return Progress(**record["progress"]), record.get("extra", {})


_RECORD_KEYS = {"progress": dict, "optimizer": dict, "scheduler": dict, "extra": dict, "digest": str}
_ADDED_LATER = {"skipped_steps"}
_PROGRESS_TYPES: dict[str, tuple[type, ...]] = {
    "epoch": (int,),
    "batch_in_epoch": (int,),
    "global_step": (int,),
    "best_metric": (int, float, type(None)),
    "best_epoch": (int, type(None)),
    "finished": (bool,),
    "skipped_steps": (int,),
}


def _bad(path: Path, key: str, problem: str) -> CheckpointError:
    return CheckpointError(
        f"{str(path)!r}: {key} {problem}; the resumable state is damaged: restore it, or start again with --overwrite"
    )


def _read_json(path: Path) -> Any:
    """The JSON value of a state or config file; an unreadable file or bad JSON is one ``CheckpointError``."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"cannot read {str(path)!r}: {error}") from None
    return jsondata.loads(text, repr(str(path)), CheckpointError)


def read_state_record(directory: Path) -> dict[str, Any]:
    """``progress.json`` of a state folder, validated as data, and the tensors file checked against it.

    Every key and type is checked before anything is restored, and ``tensors.safetensors`` must match the
    recorded digest and hold the RNG state and well-formed optimiser tensor names; a problem is one
    ``CheckpointError`` line naming the file and the key.
    """
    directory = Path(directory)
    path = directory / PROGRESS
    record = _read_json(path)
    if not isinstance(record, dict):
        raise _bad(path, "the top level", f"is {type(record).__name__}, expected an object")
    for key, kind in _RECORD_KEYS.items():
        if key not in record:
            raise _bad(path, f"key {key!r}", "is missing")
        if not isinstance(record[key], kind):
            raise _bad(path, f"key {key!r}", f"is {type(record[key]).__name__}, expected {kind.__name__}")
    extra = sorted(set(record) - set(_RECORD_KEYS))
    if extra:
        raise _bad(path, f"key {extra[0]!r}", f"is unknown (expected: {', '.join(_RECORD_KEYS)})")
    progress = record["progress"]
    names = [field.name for field in fields(Progress)]
    for name in names:
        if name not in progress and name in _ADDED_LATER:
            continue  # a state written before the field existed: Progress fills in the default
        if name not in progress:
            raise _bad(path, f"key progress.{name}", "is missing")
        value, kinds = progress[name], _PROGRESS_TYPES[name]
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise _bad(path, f"key progress.{name}", f"is {value!r}, expected {' or '.join(k.__name__ for k in kinds)}")
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise _bad(path, f"key progress.{name}", f"is {value!r}, expected a count >= 0")
    unknown = sorted(set(progress) - set(names))
    if unknown:
        raise _bad(path, f"key progress.{unknown[0]}", f"is unknown (expected: {', '.join(names)})")
    optimizer = record["optimizer"]
    if not isinstance(optimizer.get("param_groups"), list) or not isinstance(optimizer.get("scalars"), dict):
        raise _bad(path, "key optimizer", "needs a list 'param_groups' and an object 'scalars'")
    for param_id, entries in optimizer["scalars"].items():
        if not param_id.isdigit() or not isinstance(entries, dict):
            raise _bad(path, f"key optimizer.scalars.{param_id}", "is not a parameter index with an object")
    tensors_path = directory / TENSORS
    if sha256_file(tensors_path) != record["digest"]:
        raise CheckpointError(f"{str(tensors_path)!r} is truncated or modified (digest mismatch)")
    try:
        with safe_open(str(tensors_path), framework="pt") as handle:
            keys = set(handle.keys())
            rng_dtype = handle.get_slice("rng.torch").get_dtype() if "rng.torch" in keys else None
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read {str(tensors_path)!r}: {error}") from None
    if rng_dtype is None:
        raise _bad(tensors_path, "tensor 'rng.torch'", "is missing")
    if rng_dtype != "U8":
        raise _bad(tensors_path, "tensor 'rng.torch'", f"has dtype {rng_dtype}, expected U8 (a torch RNG state)")
    for key in sorted(keys):
        parts = key.split(".", 2)
        if key.startswith("optimizer.") and (len(parts) != 3 or not parts[1].isdigit()):
            raise _bad(tensors_path, f"tensor {key!r}", "is not optimizer.<index>.<name>")
    return record


def check_resumable(run_dir: Path, stage: str) -> None:
    """Validate a run's ``run_config.json`` and ``state/`` as data before ``--resume`` touches anything.

    ``run_config.json`` must be a JSON object that builds the stage's config; ``state/progress.json`` and
    ``tensors.safetensors`` (when a state was saved) are checked by ``read_state_record``. Each problem is one
    line naming the file and the key.
    """

    run_dir = Path(run_dir)
    path = run_dir / "run_config.json"
    try:
        run = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError, RecursionError):
        return  # no run, or a corrupt run.json: prepare_run_dir says so
    if not isinstance(run, dict) or run.get("stage") != stage:
        return  # a run of another stage: prepare_run_dir says so
    if not path.is_file():
        raise CheckpointError(f"--resume: {str(path)!r} is missing; the run cannot be resumed (use --overwrite)")
    tree = _read_json(path)
    if not isinstance(tree, dict):
        raise CheckpointError(f"{str(path)!r} holds {type(tree).__name__}, expected a JSON object (the run's config)")
    config_class = _stage_config(stage)
    if config_class is not None:
        try:
            from_dict(config_class, tree)
        except ConfigError as error:
            raise CheckpointError(f"{str(path)!r} is not a valid {stage} config: {error}") from None
    state = run_dir / "state"
    if (state / PROGRESS).is_file() and (state / TENSORS).is_file():
        read_state_record(state)


def _stage_config(stage: str) -> Any:
    if stage == "teacher":
        return TeacherConfig
    if stage == "transfer":
        return TransferConfig
    return None
