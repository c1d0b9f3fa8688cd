"""Checkpoint folders: ``config.json`` + ``model.safetensors`` (+ optional tensor files).

Layout of a checkpoint folder::

    config.json          format, versions, model config, file digests, training config, metrics, provenance
    model.safetensors    the embedding network's state dict
    <name>.safetensors   optional extra tensors, e.g. ``loss.safetensors`` with a Proxy-Anchor loss's proxies

Writes are atomic: the folder is assembled under a temporary name next to the target and renamed into place,
so a crash leaves either the old checkpoint or the new one, never a mix. Loads are strict: ``config.json`` is
validated as data before any tensor is read, every file's SHA-256 must match the digest recorded at save time
(truncated or tampered files are rejected), and missing or unexpected state-dict keys are an error naming
them. No pickle is involved anywhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import dmlkd.jsondata as jsondata
from dmlkd.config.convert import from_dict, to_dict
from dmlkd.errors import CheckpointError, ConfigError
from dmlkd.models import ModelConfig
from dmlkd.paths import sha256_file
from dmlkd.version import __version__

FORMAT_NAME = "dmlkd-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
_ALLOWED_TOP_KEYS = {
    "format",
    "format_version",
    "dmlkd_version",
    "model",
    "files",
    "train_config",
    "metrics",
    "provenance",
}


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def save_tensor_file(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` whose I/O failures are ``OSError`` naming ``path``.

    safetensors raises its own ``SafetensorError`` for a full disk or a refused write; turned into the
    ``OSError`` it wraps, the CLI reports it in one line like any other machine problem.
    """
    try:
        save_file(dict(tensors), str(path), metadata=metadata)
    except SafetensorError as error:
        raise safetensors_os_error(error, path) or error from None


def safetensors_os_error(error: Exception, path: Path | str) -> OSError | None:
    """The ``OSError`` (naming ``path``) a ``SafetensorError`` wraps, e.g. ENOSPC; None when it wraps none."""
    code = _OS_ERROR.search(str(error))
    if code is None:
        return None
    number = int(code.group(1))
    return OSError(number, os.strerror(number), str(path))


def _contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; a clone per tensor keeps the file self-contained.
    return {name: tensor.detach().cpu().contiguous().clone() for name, tensor in tensors.items()}


def _make_parent(target: Path) -> None:
    """Create ``target``'s parent folders; a file in the way or a refused write is a one-line ``ConfigError``."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        blocker = next((p for p in (target.parent, *target.parent.parents) if p.exists() and not p.is_dir()), None)
        reason = f"{str(blocker)!r} is a file, not a folder" if blocker else error.strerror
        raise ConfigError(f"cannot create {str(target)!r}: {reason}; choose a writable output folder") from None


def write_folder_atomically(target: Path, fill: Any) -> Path:
    """Create ``target`` by calling ``fill(tmp_dir)`` on a sibling temporary folder and renaming it into place.

    If ``target`` exists it is replaced only after the new folder is complete.
    """
    target = Path(target)
    _make_parent(target)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        fill(tmp)
        for child in tmp.iterdir():  # make the bytes durable before the rename publishes them
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    *,
    extra_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    train_config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (an ``EmbeddingNet``) and optional extra tensor files as a checkpoint folder, atomically.

    Args:
        directory: the checkpoint folder to create or replace.
        model: the embedding network; its ``config`` (a ``ModelConfig``) is stored so it can be rebuilt.
        extra_tensors: ``{"loss": {"proxies": tensor}}`` is written as ``loss.safetensors``.
        train_config, metrics, provenance: JSON-compatible records kept in ``config.json``.
    """

    files = {MODEL_FILE: model.state_dict()}
    provenance = _with_timm_record(model, provenance)
    for name, tensors in (extra_tensors or {}).items():
        if not name.replace("_", "").isalnum():
            raise ValueError(f"extra tensor file name {name!r} must be alphanumeric")
        files[f"{name}.safetensors"] = dict(tensors)

    def fill(tmp: Path) -> None:
        digests = {}
        for file_name, tensors in files.items():
            save_tensor_file(_contiguous(tensors), tmp / file_name, metadata={"format": FORMAT_NAME})
            digests[file_name] = sha256_file(tmp / file_name)
        record = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "dmlkd_version": __version__,
            "model": to_dict(model.config),
            "files": digests,
            "train_config": dict(train_config or {}),
            "metrics": dict(metrics or {}),
            "provenance": dict(provenance or {}),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    return write_folder_atomically(Path(directory), fill)


def _with_timm_record(model: nn.Module, provenance: Mapping[str, Any] | None) -> dict[str, Any]:
    """Add ``provenance["timm"]`` (timm name, tag, version, weights source) for a timm-backed model."""
    provenance = dict(provenance or {})
    timm_record = getattr(getattr(model, "backbone", None), "timm_record", None)
    if timm_record is not None:
        provenance["timm"] = timm_record()
    return provenance


def is_timm_ref(ref: object) -> bool:
    """Whether ``ref`` names a published timm model (``timm/NAME[.TAG][@REV][-0]``) rather than a folder."""
    return isinstance(ref, str) and ref.startswith("timm/")


def read_checkpoint_config(directory: str | Path) -> dict[str, Any]:
    """Read and validate ``config.json`` of a checkpoint folder without touching any tensor file."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder {str(directory)!r} does not exist")
    if not config_path.is_file():
        raise CheckpointError(
            f"{str(directory)!r} is not a dmlkd checkpoint: {CONFIG_FILE} is missing "
            f"(expected {CONFIG_FILE} and {MODEL_FILE}, or a run folder with best/ or last/)"
        )
    _refuse_link(directory, CONFIG_FILE)
    try:
        text = config_path.read_text()
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{str(config_path)!r} is not valid JSON: {error}") from None
    record = jsondata.loads(text, repr(str(config_path)), CheckpointError)
    if not isinstance(record, dict) or record.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{str(config_path)!r} is not a dmlkd checkpoint config (format != {FORMAT_NAME!r})")
    if record.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{str(config_path)!r} has format_version {record.get('format_version')!r}; "
            f"this dmlkd reads version {FORMAT_VERSION}"
        )
    unknown = set(record) - _ALLOWED_TOP_KEYS
    if unknown:
        raise CheckpointError(f"{str(config_path)!r} has unknown keys: {', '.join(sorted(unknown))}")
    files = record.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise CheckpointError(f"{str(config_path)!r} lists no {MODEL_FILE} digest under 'files'")
    for name, digest in files.items():
        if not _SAFE_NAME.match(name) or not isinstance(digest, str) or not _DIGEST.match(digest):
            raise CheckpointError(
                f"{str(config_path)!r} lists an invalid file entry {name!r}: {digest!r}; expected NAME.safetensors "
                "(letters, digits, _ . -) mapped to a 64-digit hex SHA-256"
            )
    return record


_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.safetensors$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def _hub_blobs(directory: Path) -> Path | None:
    """``<repo cache>/blobs`` when ``directory`` is a Hub cache snapshot (whose files link there), else None."""
    if directory.parent.name == "snapshots" and directory.parent.parent.name.startswith("models--"):
        return (directory.parent.parent / "blobs").resolve()
    return None


def _refuse_link(directory: Path, name: str) -> Path:
    """``directory/name`` if it is a regular file inside ``directory``; a symlink or special file is refused.

    A Hub cache snapshot is the one exception: its files are links into the cache's own ``blobs/``.
    """
    path = directory / name
    try:
        info = path.lstat()
    except FileNotFoundError:
        return path  # the caller reports the missing file
    if stat.S_ISLNK(info.st_mode):
        blobs = _hub_blobs(directory)
        target = path.resolve()
        if blobs is None or not target.is_relative_to(blobs) or not target.is_file():
            raise CheckpointError(
                f"{str(path)!r} is a symbolic link (to {os.readlink(path)!r}); a checkpoint folder must hold its "
                "files themselves: replace the link by a copy of the file"
            )
    elif not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{str(path)!r} is not a regular file; a checkpoint folder holds files only")
    return path


def _check_file_digest(directory: Path, name: str, path: Path, expected: str) -> None:
    """Refuse a listed checkpoint file that is missing or whose SHA-256 is not the one ``config.json`` records."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(directory)!r} is incomplete: {name} is missing")
    if sha256_file(path) != expected:
        raise CheckpointError(
            f"{str(path)!r} does not match the digest in {CONFIG_FILE} (truncated or modified file); "
            "re-download or re-export the checkpoint"
        )


def verify_files(directory: str | Path, record: Mapping[str, Any], skip: tuple[str, ...] = ()) -> None:
    """Check every file ``config.json`` lists: present, a regular file (no link out of the folder), digest.

    ``skip`` names files the caller checks itself as it reads them (``read_tensors``), so none is hashed twice.
    """
    directory = Path(directory)
    _refuse_link(directory, CONFIG_FILE)
    for name, expected in sorted(record["files"].items()):
        path = _refuse_link(directory, name)
        if name in skip:
            continue
        _check_file_digest(directory, name, path, expected)


def read_model_config(record: Mapping[str, Any], directory: Path) -> Any:

    try:
        return from_dict(ModelConfig, record.get("model") or {})
    except (ConfigError, CheckpointError) as error:
        raise CheckpointError(f"invalid model section in {str(directory / CONFIG_FILE)!r}: {error}") from None
    except Exception as error:  # ModelSpecError and friends from ModelConfig validation
        raise CheckpointError(f"invalid model section in {str(directory / CONFIG_FILE)!r}: {error}") from None


def read_tensors(directory: str | Path, file_name: str, record: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Load one safetensors file of a checkpoint after checking its digest against ``config.json``."""
    directory = Path(directory)
    record = record if record is not None else read_checkpoint_config(directory)
    expected = record["files"].get(file_name)
    if expected is None:
        raise CheckpointError(f"checkpoint {str(directory)!r} has no file {file_name!r}")
    path = _refuse_link(directory, file_name)
    _check_file_digest(directory, file_name, path, expected)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read {str(path)!r}: {error}") from None


def load_state_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with one-line errors naming missing/unexpected keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_preview(unexpected)}")
        raise CheckpointError(f"{source} does not fit the model: {'; '.join(parts)}")
    for key, tensor in state.items():
        if tuple(own[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source} does not fit the model: {key} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(own[key].shape)}"
            )
        if own[key].dtype != tensor.dtype:
            raise CheckpointError(
                f"{source} does not fit the model: {key} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                f"the model expects {str(own[key].dtype).removeprefix('torch.')}"
            )
    module.load_state_dict(state, strict=True)


def _preview(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


# A run folder stands for one of its checkpoints; every command that takes a run folder uses this order and
# says which one it used (``dmlkd eval`` output, embeddings metadata, export.json).
