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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dmlkd.checkpoints.io import load_state_strict, sha256_file, write_folder_atomically
from dmlkd.errors import CheckpointError

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
        save_file(tensors, str(tmp / TENSORS))
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
    try:
        record = json.loads((directory / PROGRESS).read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{str(directory / PROGRESS)!r} is not valid JSON: {error}") from None
    if sha256_file(directory / TENSORS) != record.get("digest"):
        raise CheckpointError(f"{str(directory / TENSORS)!r} is truncated or modified (digest mismatch)")
    tensors = load_file(str(directory / TENSORS))
    module_state = {k[len("module.") :]: v for k, v in tensors.items() if k.startswith("module.")}
    load_state_strict(module, module_state, f"resumable state {str(directory)!r}")
    optimizer.load_state_dict(_optimizer_join(tensors, record["optimizer"]))
    scheduler.load_state_dict(record["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return Progress(**record["progress"]), record.get("extra", {})
