"""Embed image files with any checkpoint or export and save the rows (``dmlkd embed``).

``embed_paths`` embeds image files and folders with a checkpoint, run folder, ``hf://`` reference or export
(``dmlkd.inference.embedder``) at the model's recorded eval view (``dmlkd.models.inputs``) and writes one
safetensors file whose metadata lists the image paths in row order (``read_embeddings`` reads it back).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from dmlkd.errors import ConfigError, DataError
from dmlkd.inference.embedder import embed_files, load_embedder
from dmlkd.models.inputs import DEFAULT_IMAGE_SIZE, DEFAULT_RESIZE_RATIO, RECORDED, check_resize_ratio
from dmlkd.version import __version__

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")
EMBEDDINGS_FORMAT = "dmlkd-embeddings"

logger = logging.getLogger(__name__)


def expand_image_paths(sources: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files named directly, plus every image file under named folders (recursively, sorted)."""
    paths: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise DataError(f"folder {str(path)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise DataError(f"image path {str(path)!r} does not exist (give image files or folders of images)")
    if not paths:
        raise DataError("no images given; pass image files or folders of images")
    return paths


def save_embeddings(
    path: str | os.PathLike,
    embeddings: Tensor,
    paths: Sequence[str | os.PathLike],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``embeddings (N, D)`` and the ``N`` image paths (JSON in the metadata) to a safetensors file.

    The file is written under a temporary name and renamed, so a failure leaves no partial file.
    """
    if embeddings.dim() != 2 or embeddings.shape[0] != len(paths):
        raise ValueError(f"{len(paths)} paths do not match embeddings of shape {tuple(embeddings.shape)}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": EMBEDDINGS_FORMAT, "paths": json.dumps([str(p) for p in paths])}
    header.update({key: json.dumps(value) for key, value in (metadata or {}).items()})
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        save_file({"embeddings": embeddings.detach().cpu().contiguous()}, str(tmp), metadata=header)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def read_embeddings(path: str | os.PathLike) -> tuple[Tensor, list[str], dict[str, Any]]:
    """Read a file written by ``save_embeddings``: ``(embeddings (N, D), paths, other metadata)``."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            if header.get("format") != EMBEDDINGS_FORMAT:
                raise DataError(f"{str(path)!r} is not a dmlkd embeddings file (written by `dmlkd embed`)")
            embeddings = handle.get_tensor("embeddings")
    except (SafetensorError, OSError) as error:
        raise DataError(f"cannot read embeddings file {str(path)!r}: {error}") from None
    paths = json.loads(header["paths"])
    extra = {key: json.loads(value) for key, value in header.items() if key not in ("format", "paths")}
    return embeddings, paths, extra


def read_embeddings_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of an embeddings file (without the paths and without reading the tensor)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise DataError(f"cannot read embeddings file {str(path)!r}: {error}") from None
    return {key: json.loads(value) for key, value in header.items() if key not in ("format", "paths")}


def embed_paths(
    ref: str | os.PathLike,
    sources: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    image_size: int | None = None,
    resize_ratio: float | str | None = RECORDED,
    batch_size: int = 64,
    normalize: bool = False,
    device: str = "auto",
    overwrite: bool = False,
    skip_bad_images: bool = False,
) -> tuple[int, int, list[tuple[str, str]]]:
    """Embed image files/folders with the model of ``ref`` and save them to ``out``.

    ``ref`` is a checkpoint or run folder, an ``hf://`` reference or an export folder (ONNX, torch.export).
    An existing ``out`` is refused unless ``overwrite``; rows follow ``expand_image_paths(sources)``. The
    file's metadata records the source checkpoint's model digest and the input size, which ``dmlkd search``
    checks before it embeds queries against the file. With ``skip_bad_images`` unreadable files are left out
    (and listed in the metadata as ``skipped``) instead of stopping the run.

    Returns:
        ``(N, D, skipped)``: images embedded, embedding dimension and ``(path, reason)`` of each skipped file.
    """
    if Path(out).is_dir():
        raise ConfigError(f"--out {str(out)!r} is a folder; pass the path of a .safetensors file to write")
    if batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size}")
    if Path(out).exists() and not overwrite:
        raise ConfigError(f"output file {str(out)!r} already exists; pass --overwrite to replace it")
    check_resize_ratio(resize_ratio)
    paths = expand_image_paths(sources)
    embedder = load_embedder(ref, device=device)
    size = checked_image_size(embedder, image_size)
    if embedder.image_size is not None and size != embedder.image_size:
        logger.warning(
            "embedding at %d px, but this model was trained and evaluated at %d px (its recorded input size)",
            size,
            embedder.image_size,
        )
    if resize_ratio == RECORDED:
        resize_ratio = embedder.resize_ratio if embedder.resize_ratio is not None else DEFAULT_RESIZE_RATIO
    embeddings, kept, skipped = embed_files(
        embedder, paths, size, resize_ratio, batch_size, skip_bad=skip_bad_images, normalize=normalize
    )
    metadata = {
        "checkpoint": embedder.checkpoint,
        "checkpoint_note": embedder.checkpoint_note,
        "model_ref": embedder.ref,
        "model_kind": embedder.kind,
        "model_digest": embedder.model_digest,
        "spec": embedder.spec,
        "normalized": bool(normalize or embedder.normalized),
        "image_size": size,
        "resize_ratio": resize_ratio,
        "skipped": [path for path, _reason in skipped],
        "dmlkd_version": __version__,
    }
    save_embeddings(out, embeddings, kept, metadata)
    return int(embeddings.shape[0]), int(embeddings.shape[1]), skipped


def checked_image_size(embedder: Any, image_size: int | None) -> int:
    """The input size to embed at: ``image_size``, else the model's recorded size, else 224.

    An export only takes the size it was exported for; asking for another is a ``ConfigError``.
    """
    if image_size is not None and image_size < 1:
        raise ConfigError(f"image size must be a positive integer, got {image_size}")
    if embedder.fixed_size and image_size is not None and image_size != embedder.image_size:
        raise ConfigError(
            f"{embedder.ref!r} is a {embedder.kind} export for {embedder.image_size}x{embedder.image_size} "
            f"inputs; --image-size {image_size} cannot be used with it"
        )
    return image_size or embedder.image_size or DEFAULT_IMAGE_SIZE
