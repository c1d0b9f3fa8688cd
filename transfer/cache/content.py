"""What the teacher cache knows of the images: a SHA-256 of each image's *content*, with a fast path for files.

A cache is keyed by ``images_digest(collection)``: a hash over ``(identifier, content hash)`` of every image in
order, so two folders whose files share names but not pixels get different caches, and so do glyph sets rendered
with another seed or size.

- In-memory images (``ArrayImageCollection``, e.g. the glyph demo data) are hashed from their array bytes
  (dtype and shape included); this is fast (SOP-sized arrays of 32 px glyphs hash in milliseconds).
- Image files (``FileImageCollection``) are hashed from their bytes. To avoid re-reading a 120k-image dataset on
  every run, a side index ``<cache folder>/image-index-<root digest>.json`` remembers each file's
  ``(size, mtime_ns, ctime_ns, inode)`` with its hash; a file whose stat record matches is not re-read, any other
  is hashed again (and the index rewritten atomically). Only a ``stat`` per file is paid on a warm index.
  ``ctime`` cannot be set from user space, so restoring an old ``mtime`` after editing a file does not hide it.
- ``Subset`` uses its base collection's hashes; any other collection is hashed from its decoded pixels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dmlkd.data.base import ArrayImageCollection, FileImageCollection, ImageCollection, Subset
from dmlkd.errors import DataError
from dmlkd.paths import sha256_file

logger = logging.getLogger(__name__)

INDEX_VERSION = 1


def _file_sha256(path: Path) -> str:
    """``sha256_file`` of an image, its read errors told as the ``DataError`` of a broken dataset."""
    try:
        return sha256_file(path)
    except FileNotFoundError:
        raise DataError(f"image file {str(path)!r} does not exist") from None
    except OSError as error:
        raise DataError(f"cannot read image {str(path)!r}: {error}") from None


def _stat_record(path: Path) -> list[int]:
    try:
        status = path.stat()
    except FileNotFoundError:
        raise DataError(f"image file {str(path)!r} does not exist") from None
    return [int(status.st_size), int(status.st_mtime_ns), int(status.st_ctime_ns), int(status.st_ino)]


def _index_path(folder: Path, root: Path) -> Path:
    name = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return folder / f"image-index-{name}.json"


def _read_index(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != INDEX_VERSION or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _write_index(path: Path, root: Path, files: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(handle, "w") as file:
            json.dump({"version": INDEX_VERSION, "root": str(root.resolve()), "files": files}, file)
        os.replace(temporary, path)
    except OSError as error:  # the index only saves time; a read-only cache folder costs a rehash next run
        logger.warning("could not write the image hash index %s (%s)", path, error)


def file_digests(collection: FileImageCollection, index_folder: str | Path | None) -> list[str]:
    """The SHA-256 of every file of ``collection``, re-reading only files whose stat record changed."""
    root = collection.root
    index_path = None if index_folder is None else _index_path(Path(index_folder), root)
    known = {} if index_path is None else _read_index(index_path)
    updated: dict[str, Any] = dict(known)
    hashed = 0
    digests = []
    for name in collection.identifiers:
        path = root / name
        record = _stat_record(path)
        entry = known.get(name)
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == record:
            digests.append(str(entry[1]))
            continue
        value = _file_sha256(path)
        hashed += 1
        updated[name] = [record, value]
        digests.append(value)
    if hashed:
        logger.info("hashed %d of %d image files under %s", hashed, len(digests), root)
        if index_path is not None:
            _write_index(index_path, root, updated)
    return digests


def _array_digests(collection: ArrayImageCollection, positions: list[int] | None) -> list[str]:
    images = collection.images
    head = f"{images.dtype.str}|{tuple(images.shape[1:])}|".encode()
    chosen = range(len(collection)) if positions is None else positions
    return [hashlib.sha256(head + np.ascontiguousarray(images[i]).tobytes()).hexdigest() for i in chosen]


def image_digests(collection: ImageCollection, index_folder: str | Path | None = None) -> list[str]:
    """One content SHA-256 per image of ``collection``, in order (see the module docstring)."""
    if isinstance(collection, Subset):
        base = collection.base
        if isinstance(base, ArrayImageCollection):
            return _array_digests(base, collection.positions)
        every = image_digests(base, index_folder)
        return [every[i] for i in collection.positions]
    if isinstance(collection, ArrayImageCollection):
        return _array_digests(collection, None)
    if isinstance(collection, FileImageCollection):
        return file_digests(collection, index_folder)
    logger.info("hashing the decoded pixels of %d images (%s)", len(collection), type(collection).__name__)
    digests = []
    for index in range(len(collection)):
        pixels = np.asarray(collection.load(index))
        head = f"{pixels.dtype.str}|{pixels.shape}|".encode()
        digests.append(hashlib.sha256(head + np.ascontiguousarray(pixels).tobytes()).hexdigest())
    return digests


def images_digest(collection: ImageCollection, index_folder: str | Path | None = None) -> str:
    """A SHA-256 over ``(identifier, content SHA-256)`` of every image, in order: the cache key's image part."""
    digest = hashlib.sha256()
    for name, content in zip(collection.identifiers, image_digests(collection, index_folder)):
        digest.update(f"{name}\0{content}\n".encode())
    return digest.hexdigest()
