"""Teacher-cache file helpers: content digests, atomic writes, metadata and tensor checks on reading.

``dmlkd.transfer.cache.teacher_cache`` builds, loads and describes caches (and does the logging); this module
holds what it does with the safetensors file itself. A ``ValueError`` from ``read_checked`` says in words why a
file is not usable; ``differing_parts`` lists the key parts in which a file's metadata differs from the wanted ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from dmlkd.checkpoints.folder import safetensors_os_error
from dmlkd.engine.writable import probe_writable
from dmlkd.errors import ConfigError
from dmlkd.transfer.cache.spec import CacheSpec, sha256_json

FORMAT_NAME = "dmlkd-teacher-cache"
CHUNK_FORMAT_NAME = "dmlkd-teacher-cache-chunk"
READ_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError, KeyError, TypeError)


def content_digest(tensors: Mapping[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def check_writable_folder(folder: Path, *, create: bool = True) -> None:
    """Refuse a cache folder that cannot be written before hours are spent computing what goes in it.

    Without ``create`` nothing is made: the nearest existing ancestor must be a writable folder (the checks made
    before a run starts write nothing).
    """
    try:
        probe_writable(folder, create=create)
    except OSError as error:
        raise ConfigError(
            f"teacher cache folder {str(folder)!r} is not writable ({error.strerror}); set "
            "--set teacher.cache_dir=A_WRITABLE_FOLDER (or the DMLKD_CACHE variable), or use --teacher-mode online"
        ) from None


def write_atomically(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        try:
            save_file(tensors, temporary, metadata=metadata)
        except SafetensorError as error:  # a full disk: an OSError naming the file, reported in one line
            raise safetensors_os_error(error, temporary) or error from None
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def differing_parts(stored: Mapping[str, str], parts: Mapping[str, str]) -> list[str]:
    """The key parts in which a file's metadata differs from the wanted ones, readable."""
    found = []
    for name, wanted in parts.items():
        have = stored.get(name)
        if have == wanted:
            continue
        if name == "spec" and have is not None:
            with contextlib.suppress(ValueError, AttributeError):
                old, new = json.loads(have), json.loads(wanted)
                found += [
                    f"spec.{field} {old.get(field)!r} -> {new.get(field)!r}"
                    for field in sorted(set(old) | set(new))
                    if old.get(field) != new.get(field)
                ]
                continue
        found.append(f"{name} {str(have)[:16]!r} -> {wanted[:16]!r}")
    return found


def read_checked(path: Path, parts: Mapping[str, str], spec: CacheSpec) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a cache file that matches ``parts``; ``ValueError`` says why it does not."""
    with safe_open(str(path), framework="pt") as file:
        metadata = dict(file.metadata() or {})
        names = set(file.keys())
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError("not a dmlkd teacher cache")
    differences = differing_parts(metadata, parts)
    if differences:
        raise ValueError("it was built for different inputs: " + "; ".join(differences))
    if metadata.get("key") != sha256_json(dict(parts)):
        raise ValueError("its recorded key does not match its key parts")
    wanted = {"embeddings", "pooled"} if spec.with_pooled else {"embeddings"}
    if names != wanted:
        raise ValueError(f"it holds tensors {sorted(names)}, expected {sorted(wanted)}")
    tensors = load_file(str(path))
    shape = (int(parts["num_images"]), spec.num_sets)
    for name, tensor in tensors.items():
        if tensor.dtype != torch.float16 or tensor.dim() != 3 or tuple(tensor.shape[:2]) != shape:
            raise ValueError(f"{name} is {tensor.dtype} {tuple(tensor.shape)}, expected float16 {shape} + (D,)")
    if content_digest(tensors) != metadata.get("content_sha256"):
        raise ValueError("its tensor bytes do not match the recorded SHA-256 (corrupt file)")
    return tensors, metadata


def chunk_path(folder: Path, start: int, stop: int) -> Path:
    return folder / f"chunk-{start:09d}-{stop:09d}.safetensors"


def write_chunk(folder: Path, start: int, stop: int, tensors: dict[str, Tensor], key: str) -> None:
    """One finished range of rows of a cache being built, written atomically (a resumed build keeps it)."""
    metadata = {
        "format": CHUNK_FORMAT_NAME,
        "key": key,
        "start": str(start),
        "stop": str(stop),
        "content_sha256": content_digest(tensors),
    }
    write_atomically(chunk_path(folder, start, stop), tensors, metadata)


def read_chunk(
    folder: Path, start: int, stop: int, key: str, names: tuple[str, ...], sets: int
) -> dict[str, Tensor] | None:
    """The rows of a finished chunk of the build with ``key``, or None if it is missing or does not check out."""
    path = chunk_path(folder, start, stop)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = dict(file.metadata() or {})
        wanted = {"format": CHUNK_FORMAT_NAME, "key": key, "start": str(start), "stop": str(stop)}
        if any(metadata.get(name) != value for name, value in wanted.items()):
            return None
        tensors = load_file(str(path))
        if set(tensors) != set(names) or content_digest(tensors) != metadata.get("content_sha256"):
            return None
        if any(t.dtype != torch.float16 or tuple(t.shape[:2]) != (stop - start, sets) for t in tensors.values()):
            return None
    except READ_ERRORS:
        return None
    return tensors
