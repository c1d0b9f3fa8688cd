"""Teacher-output cache for embedding transfer: the teacher's outputs on replayable views, computed once.

Modes (``CacheSpec.mode``):

- ``cached`` (exact replay): image ``i`` has ``K`` view parameter sets, set ``k`` being
  ``replay_view_params(ReplaySpec(K, seed), i, k, width, height, scale, ratio, flip_p)``, and the teacher's
  output on each ``(i, k)`` view is stored. A ``TrainDataset(..., replay=spec.replay)`` shows the student
  exactly these views, so ``cache.lookup(batch.indices, replay_k)`` equals the online teacher on the same
  batch up to fp16 rounding (the online teacher of seed-spec §1 item 3, minus the teacher forward).
- ``clean``: ``K = 1``, the deterministic eval view. Cheaper, but a *different method*: the teacher no longer
  sees the student's view (seed-spec §1 item 5a), so two views of one image get identical teacher rows.

A cache is one safetensors file ``teacher-<key[:16]>.safetensors`` holding ``embeddings`` ``(N, K, D)`` fp16
and, with ``with_pooled``, ``pooled`` ``(N, K, P)`` fp16. It costs ``N*K*D*2`` bytes of disk and of host
memory while building, and the same on the device while training: SOP train with K=8, D=512 is
59,551 x 8 x 512 x 2 B ≈ 488 MB. The file metadata holds every part of the key (content spec including the
precision the teacher ran at, teacher digest over weights *and* model config, a digest of the images'
identifiers *and contents* (``content``), dmlkd/torch/Pillow versions), the key and a SHA-256 of the
tensor bytes; a file whose parts, key, shapes or bytes do not check out is rebuilt (the differing part is
logged), never used.

A build is resumable: rows are computed in chunks of images, each chunk written atomically to
``teacher-<key[:16]>.partial/`` as it finishes; an interrupted build (Ctrl-C, a crash, a killed job) started
again with the same key computes only the missing chunks. The finished file is written atomically and the
chunk folder removed.

Parts: ``spec`` (the spec and the key), ``content`` (image content digests), ``views`` (running the teacher on
the views, sharded over processes), ``storage`` (the checked, atomic file), ``lookup`` (the loaded cache); this
module builds, loads and describes a cache file; ``admin`` lists and ages caches on disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm

from dmlkd.data.base import ImageCollection
from dmlkd.engine.distributed import (
    any_true,
    barrier,
    broadcast_object,
    is_main,
)
from dmlkd.errors import ConfigError, DataError
from dmlkd.transfer.cache.content import images_digest as digest_images
from dmlkd.transfer.cache.lookup import RefreshingCache, TeacherCache
from dmlkd.transfer.cache.spec import CacheSpec, cache_key, cache_path, digest_of, key_parts, teacher_digest
from dmlkd.transfer.cache.storage import (
    FORMAT_NAME,
    READ_ERRORS,
    check_writable_folder,
    content_digest,
    differing_parts,
    read_checked,
    read_chunk,
    sha256_json,
    write_atomically,
    write_chunk,
)
from dmlkd.transfer.cache.views import run_teacher

__all__ = [
    "CacheSpec",
    "RefreshingCache",
    "TeacherCache",
    "build_cache",
    "cache_key",
    "cache_path",
    "describe_cache",
    "load_or_build_cache",
    "teacher_digest",
]

logger = logging.getLogger(__name__)

CHUNK_VIEWS = 8192  # teacher views per resumable chunk (chunk_images = CHUNK_VIEWS // K)


def _device_of(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def build_cache(
    teacher: nn.Module,
    collection: ImageCollection,
    spec: CacheSpec,
    path: str | Path,
    *,
    key: str | None = None,
    teacher_digest: str | None = None,
    images_digest: str | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    chunk_images: int | None = None,
) -> TeacherCache:
    """Run the teacher (eval mode, no grad) on every cached view and write the cache file atomically.

    Args:
        teacher: returns a ``ModelOutput`` for RGB ``[0, 1]`` images; its train/eval flags are restored.
        collection: the training images; row ``i`` of the cache is ``collection`` item ``i``.
        spec: what to cache (``spec.autocast``: the precision the teacher runs at).
        path: the file to write (``load_or_build_cache`` uses ``cache_path(folder, key)``).
        key: if given, must equal ``cache_key(spec, teacher_digest, collection)``.
        teacher_digest: recorded in the metadata (default: ``teacher_digest(teacher)``).
        images_digest: ``cache_content.images_digest(collection)`` if already computed.
        batch_size: views per teacher forward (``batch_size // K`` images, at least one).
        num_workers: data loader workers that decode and crop the images.
        device: where the teacher runs and the returned cache lives (default: the teacher's device).
        progress: show a progress bar in images/s.
        chunk_images: images per resumable chunk (default ``CHUNK_VIEWS // K``); finished chunks of an
            interrupted build with the same key are reused.
    """
    path = Path(path)
    digest = teacher_digest if teacher_digest is not None else digest_of(teacher)
    parts = key_parts(spec, digest, collection, images_digest, index_folder=path.parent)
    expected = sha256_json(parts)
    if key is not None and key != expected:
        raise ConfigError(f"cache key {key[:16]}... does not match the spec, teacher and images ({expected[:16]}...)")
    count = len(collection)
    if count == 0:
        raise DataError("the teacher cache covers 0 of 0 images; nothing to cache")
    device = _device_of(teacher, device)
    teacher.to(device)  # the images go to ``device``; so must the teacher
    tensors = _run_in_chunks(
        teacher, collection, spec, path, expected, device, batch_size, num_workers, progress, chunk_images
    )
    config = getattr(teacher, "config", None)
    metadata = {
        **parts,
        "format": FORMAT_NAME,
        "key": expected,
        "content_sha256": content_digest(tensors),
        "identifiers_sha256": sha256_json([str(name) for name in collection.identifiers]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "teacher_config": json.dumps(asdict(config) if is_dataclass(config) else None, sort_keys=True),
    }
    metadata = broadcast_object(metadata)
    if is_main():  # the processes built it together; one writes it
        write_atomically(path, tensors, metadata)
        shutil.rmtree(_partial_folder(path), ignore_errors=True)
        logger.info("wrote teacher cache %s (%s images x %d views)", path, count, spec.num_sets)
    barrier()
    return TeacherCache.from_tensors(tensors, spec, expected, metadata, device)


def _partial_folder(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".safetensors") + ".partial")


def _run_in_chunks(
    teacher: nn.Module,
    collection: ImageCollection,
    spec: CacheSpec,
    path: Path,
    key: str,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    progress: bool,
    chunk_images: int | None,
) -> dict[str, Tensor]:
    """Every cached row, chunk by chunk: finished chunks of an earlier build are read, the rest computed."""
    count, sets = len(collection), spec.num_sets
    size = max(1, int(chunk_images or CHUNK_VIEWS // sets))
    ranges = [(start, min(start + size, count)) for start in range(0, count, size)]
    names = ("embeddings", "pooled") if spec.with_pooled else ("embeddings",)
    folder = _partial_folder(path)
    found = [read_chunk(folder, start, stop, key, names, sets) for start, stop in ranges]
    missing = any_true(*(rows is None for rows in found)) if ranges else ()
    reused = sum(not flag for flag in missing)
    if reused:
        logger.info("resuming teacher cache %s: %d of %d chunks already built", path, reused, len(ranges))
    pieces: list[dict[str, Tensor]] = []
    with tqdm(total=count, desc="teacher cache", unit="img", disable=not progress) as bar:
        for (start, stop), rows, absent in zip(ranges, found, missing):
            if not absent:
                assert rows is not None
                bar.update(stop - start)
                pieces.append(rows)
                continue
            rows = run_teacher(teacher, collection, spec, device, batch_size, num_workers, bar, start, stop)
            if is_main():
                try:
                    write_chunk(folder, start, stop, rows, key)
                except BaseException:
                    with contextlib.suppress(OSError):
                        folder.rmdir()  # only if empty: finished chunks stay for the next try
                    raise
            barrier()
            pieces.append(rows)
    return {name: torch.cat([piece[name] for piece in pieces]) for name in names}


def _log_other_caches(folder: Path, parts: Mapping[str, str], path: Path) -> None:
    for other in sorted(folder.glob("teacher-*.safetensors"))[:8]:
        if other == path:
            continue
        try:
            with safe_open(str(other), framework="pt") as file:
                differences = differing_parts(file.metadata() or {}, parts)
        except READ_ERRORS:
            continue
        logger.info("not using teacher cache %s: %s", other, "; ".join(differences) or "other key")


def load_or_build_cache(
    teacher: nn.Module,
    collection: ImageCollection,
    spec: CacheSpec,
    folder: str | Path,
    *,
    teacher_digest: str,
    batch_size: int = 128,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> TeacherCache:
    """The valid cache ``<folder>/teacher-<key[:16]>.safetensors``, built (or rebuilt) if needed.

    A missing, unreadable, truncated, corrupt or mismatching file (another teacher, spec, image list or
    version) is rebuilt; the reason is logged. Arguments are those of ``build_cache``; the returned cache
    lives on ``device`` (default: the teacher's device).
    """
    images = digest_images(collection, folder)
    parts = key_parts(spec, teacher_digest, collection, images)
    key = sha256_json(parts)
    path = cache_path(folder, key)
    found = path.is_file()
    if found:
        try:
            tensors, metadata = read_checked(path, parts, spec)
        except READ_ERRORS as error:
            logger.warning("teacher cache %s is not usable (%s); rebuilding it", path, error)
            found = False
    (rebuild,) = any_true(not found)  # with several processes: all use the file, or all build together
    if not rebuild:
        logger.info("using teacher cache %s", path)
        return TeacherCache.from_tensors(tensors, spec, key, metadata, _device_of(teacher, device))
    if is_main():
        check_writable_folder(Path(folder))
    if is_main() and not path.is_file():
        _log_other_caches(Path(folder), parts, path)
    return build_cache(
        teacher,
        collection,
        spec,
        path,
        key=key,
        teacher_digest=teacher_digest,
        images_digest=images,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        progress=progress,
    )


def describe_cache(path: str | Path) -> dict[str, Any]:
    """A JSON-compatible summary of a cache file read from its header (tensors are not loaded)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = dict(file.metadata() or {})
            shapes = {name: list(file.get_slice(name).get_shape()) for name in file.keys()}
        if metadata.get("format") != FORMAT_NAME or "embeddings" not in shapes:
            raise ValueError("no dmlkd teacher cache metadata")
        spec, teacher = json.loads(metadata["spec"]), json.loads(metadata.get("teacher_config", "null"))
    except (*READ_ERRORS, json.JSONDecodeError) as error:
        raise DataError(f"{str(path)!r} is not a readable dmlkd teacher cache ({error})") from None
    pooled = shapes.get("pooled")
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "key": metadata.get("key"),
        "mode": spec.get("mode"),
        "num_images": shapes["embeddings"][0],
        "num_sets": shapes["embeddings"][1],
        "embedding_dim": shapes["embeddings"][2],
        "pooled_dim": pooled[2] if pooled else None,
        "dtype": "float16",
        "spec": spec,
        "teacher": teacher,
        **{
            name: metadata.get(name)
            for name in (
                "teacher_digest",
                "images_digest",
                "dmlkd_version",
                "torch_version",
                "pillow_version",
                "created",
            )
        },
    }
