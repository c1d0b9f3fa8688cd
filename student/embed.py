"""Embed images with a trained model: PIL images, image files or tensors in, an ``(N, D)`` tensor out.

PIL images and files get the evaluation view (``eval_view``: shorter side to ``round(size * resize_ratio)``,
centre crop ``size``), tensors are used as given. The model applies its own preprocessing, so inputs are
always RGB in [0, 1] (uint8 tensors in 0-255 are scaled). ``save_embeddings`` writes the result as one
safetensors file whose metadata lists the image paths in row order (``read_embeddings`` reads it back).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

from dmlkd.errors import ConfigError, DataError

DEFAULT_IMAGE_SIZE = 224
DEFAULT_RESIZE_RATIO = 256 / 224
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")
EMBEDDINGS_FORMAT = "dmlkd-embeddings"
_RANGE_SLACK = 1e-3  # float inputs may overshoot [0, 1] by rounding, not by a different convention

ImageInput = Image.Image | str | os.PathLike | Tensor | Sequence[Image.Image | str | os.PathLike]


def recorded_image_size(record: dict[str, Any]) -> int | None:
    """The input size a checkpoint record implies: an export's size, the training or eval image size, else the
    input size of a timm model's pretrained config."""
    exported = (record.get("provenance") or {}).get("export") or {}
    train_config = record.get("train_config") or {}
    for value in (
        exported.get("image_size"),
        (train_config.get("train") or {}).get("image_size"),
        (train_config.get("eval") or {}).get("image_size"),
        ((record.get("model") or {}).get("preprocessing") or {}).get("input_size"),  # timm pretrained config
    ):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def attach_embed_defaults(model: nn.Module, record: dict[str, Any]) -> nn.Module:
    """Remember the checkpoint's image size on ``model`` (as ``embed_image_size``) for ``embed`` to use."""
    model.embed_image_size = recorded_image_size(record)
    return model


def default_image_size(model: nn.Module) -> int:
    """``model.embed_image_size`` when a loader recorded one, else 224."""
    return getattr(model, "embed_image_size", None) or DEFAULT_IMAGE_SIZE


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _check_tensor(images: Tensor) -> Tensor:
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] != 3:
        raise DataError(f"embed expects image tensors of shape (B, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise DataError(f"embed expects a float tensor in [0, 1] or a uint8 tensor in 0-255, got {images.dtype}")
    if images.numel():
        low, high = float(images.min()), float(images.max())
        if low < -_RANGE_SLACK or high > 1 + _RANGE_SLACK:
            raise DataError(
                f"embed expects float RGB values in [0, 1] (the model normalises itself), got values in "
                f"[{low:.3g}, {high:.3g}]; pass unnormalised images or a uint8 tensor"
            )
    return images


def _as_float(images: Tensor, device: torch.device) -> Tensor:
    images = images.to(device)
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255)
    return images.to(torch.float32)


def _as_items(images: Any) -> list[Any]:
    if isinstance(images, (Image.Image, str, os.PathLike)):
        return [images]
    if isinstance(images, (list, tuple)):
        for item in images:
            if not isinstance(item, (Image.Image, str, os.PathLike)):
                raise DataError(
                    f"embed got a list holding {type(item).__name__}; lists may hold PIL images or file "
                    "paths (pass tensors as one (B, 3, H, W) tensor)"
                )
        return list(images)
    raise DataError(
        f"embed cannot read {type(images).__name__}; pass a PIL image, a file path, a list of those, "
        "or a (B, 3, H, W) tensor"
    )


def open_image(item: Image.Image | str | os.PathLike) -> Image.Image:
    """An RGB PIL image from a PIL image or a file path; unreadable files are a ``DataError`` naming them."""
    if isinstance(item, Image.Image):
        return item if item.mode == "RGB" else item.convert("RGB")
    path = Path(item)
    if not path.is_file():
        raise DataError(f"image file {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"cannot read image {str(path)!r}: {error}") from None


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _pil_batches(items: list[Any], batch_size: int, image_size: int, resize_ratio: float) -> Iterable[Tensor]:
    from dmlkd.data.transforms import eval_view

    for chunk in _chunks(items, batch_size):
        yield torch.stack([eval_view(open_image(item), image_size, resize_ratio) for item in chunk])


def _batches(images: Any, batch_size: int, image_size: int, resize_ratio: float) -> Iterable[Tensor]:
    if isinstance(images, Tensor):
        return _chunks(_check_tensor(images), batch_size)
    return _pil_batches(_as_items(images), batch_size, image_size, resize_ratio)


def embed_images(
    model: nn.Module,
    images: ImageInput,
    *,
    image_size: int | None = None,
    resize_ratio: float | None = DEFAULT_RESIZE_RATIO,
    batch_size: int = 64,
    normalize: bool = False,
) -> Tensor:
    """Embed images with ``model`` (an ``EmbeddingNet``) on the device its parameters are on.

    Args:
        model: returns a ``ModelOutput`` (or a ``(B, D)`` tensor) for RGB ``(B, 3, S, S)`` in [0, 1].
        images: a PIL image, a file path, a list of those (each gets the eval view at ``image_size``), or a
            tensor ``(B, 3, H, W)`` / ``(3, H, W)``, float in [0, 1] or uint8 in 0-255 (used at its own size).
        image_size: crop size of the eval view; None uses the checkpoint's recorded size, else 224.
        resize_ratio: eval view zoom (shorter side resized to ``round(image_size * resize_ratio)``); None or 1
            means no zoom-in.
        batch_size: images per forward pass.
        normalize: L2-normalise each row of the result.

    Returns:
        ``(N, D)`` float32 embeddings on the CPU, in input order, computed under ``no_grad`` in eval mode
        (the model's previous train/eval mode is restored).
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size}")
    size = image_size if image_size is not None else default_image_size(model)
    if size < 1:
        raise ConfigError(f"image size must be a positive integer, got {size}")
    device = _model_device(model)
    rows: list[Tensor] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in _batches(images, batch_size, size, resize_ratio):
                output = model(_as_float(batch, device))
                rows.append(getattr(output, "embedding", output).float().cpu())
    finally:
        model.train(was_training)
    if not rows:
        return torch.empty(0, _embedding_dim(model))
    embeddings = torch.cat(rows)
    return F.normalize(embeddings, p=2, dim=1) if normalize else embeddings


def _embedding_dim(model: nn.Module) -> int:
    return int(getattr(model, "embedding_dim", 0))


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
    from safetensors.torch import save_file

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
    from safetensors import SafetensorError, safe_open

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


def embed_paths(
    ref: str | os.PathLike,
    sources: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    image_size: int | None = None,
    resize_ratio: float | None = DEFAULT_RESIZE_RATIO,
    batch_size: int = 64,
    normalize: bool = False,
    device: str = "auto",
    overwrite: bool = False,
) -> tuple[int, int]:
    """Embed image files/folders with the model of checkpoint or run folder ``ref`` and save them to ``out``.

    An existing ``out`` is refused unless ``overwrite``; rows follow ``expand_image_paths(sources)``.

    Returns:
        ``(N, D)``: how many images were embedded and the embedding dimension.
    """
    from dmlkd import __version__
    from dmlkd.checkpoints import load_checkpoint, resolve_checkpoint_dir
    from dmlkd.engine.evaluate import resolve_device

    if Path(out).exists() and not overwrite:
        raise ConfigError(f"output file {str(out)!r} already exists; pass --overwrite to replace it")
    paths = expand_image_paths(sources)
    directory = resolve_checkpoint_dir(ref)
    model, record = load_checkpoint(directory, device=resolve_device(device))
    attach_embed_defaults(model, record)
    size = image_size if image_size is not None else default_image_size(model)
    embeddings = embed_images(
        model, paths, image_size=size, resize_ratio=resize_ratio, batch_size=batch_size, normalize=normalize
    )
    metadata = {
        "checkpoint": str(directory),
        "model_digest": record["files"]["model.safetensors"],
        "spec": str(model.config.spec),
        "normalized": bool(normalize or model.config.l2_norm),
        "image_size": size,
        "resize_ratio": resize_ratio,
        "dmlkd_version": __version__,
    }
    save_embeddings(out, embeddings, paths, metadata)
    return int(embeddings.shape[0]), int(embeddings.shape[1])
