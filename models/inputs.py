"""What an embedding model takes in: the recorded eval view and the embedding loop over images or tensors.

PIL images and files get the evaluation view (``eval_view``: shorter side to ``round(size * resize_ratio)``,
bilinear, centre crop ``size``), tensors are used as given. Size and ratio default to the model's *input
record* (``provenance.input`` of its checkpoint: the eval view it was trained and evaluated with, written by
both trainers), so the demo's 32 px glyph models are embedded at 32 px, not 224; asking for another size
works and logs a warning. The model applies its own preprocessing, so inputs are always RGB in [0, 1] (uint8
tensors in 0-255 are scaled). ``model.embed`` and ``dmlkd.inference`` (files, exports, search) build on it;
checkpoint loading attaches the record to the model (``attach_embed_defaults``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

from dmlkd.data.base import to_rgb
from dmlkd.data.transforms import eval_view
from dmlkd.errors import ConfigError, DataError

DEFAULT_IMAGE_SIZE = 224
DEFAULT_RESIZE_RATIO = 256 / 224
_RANGE_SLACK = 1e-3  # float inputs may overshoot [0, 1] by rounding, not by a different convention

RECORDED = "recorded"  # ``resize_ratio`` default: the model's recorded eval view, else 256/224

ImageInput = Image.Image | str | os.PathLike | Tensor | Sequence[Image.Image | str | os.PathLike]

logger = logging.getLogger(__name__)


def input_record(image_size: int, resize_ratio: float | None, train_image_size: int | None = None) -> dict[str, Any]:
    """What a checkpoint records about its input (``provenance.input``): the eval view it was evaluated with
    (and that ``embed``, ``model.embed``, ``export`` and ``eval`` use by default) and the training crop size."""
    record: dict[str, Any] = {
        "image_size": int(image_size),
        "resize_ratio": float(resize_ratio or 1.0),
        "resize": "shorter side to round(image_size * resize_ratio)",
        "crop": "center",
        "interpolation": "bilinear",
        "value_range": "RGB [0, 1] (the model applies its own preprocessing)",
    }
    if train_image_size is not None:
        record["train_image_size"] = int(train_image_size)
        record["train_crop"] = "random resized crop (scale, ratio), bilinear"
    return record


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def recorded_image_size(record: dict[str, Any]) -> int | None:
    """The input size a checkpoint record implies: its input record, an export's size, the training or eval
    image size of its config, else the input size of a timm model's pretrained config."""
    provenance = record.get("provenance") or {}
    exported = provenance.get("export") or {}
    train_config = record.get("train_config") or {}
    for value in (
        (provenance.get("input") or {}).get("image_size"),
        exported.get("image_size"),
        (train_config.get("eval") or {}).get("image_size"),
        (train_config.get("train") or {}).get("image_size"),
        ((record.get("model") or {}).get("preprocessing") or {}).get("input_size"),  # timm pretrained config
    ):
        if _positive_int(value):
            return value
    return None


def recorded_resize_ratio(record: dict[str, Any]) -> float | None:
    """The eval-view resize ratio a checkpoint record holds (its input record or an export's), else None."""
    provenance = record.get("provenance") or {}
    for source in (provenance.get("input") or {}, provenance.get("export") or {}):
        value = source.get("resize_ratio")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 1:
            return float(value)
    return None


def attach_embed_defaults(model: nn.Module, record: dict[str, Any]) -> nn.Module:
    """Remember the checkpoint's eval view on ``model`` (``embed_image_size``, ``embed_resize_ratio``)."""
    model.embed_image_size = recorded_image_size(record)
    model.embed_resize_ratio = recorded_resize_ratio(record)
    return model


def default_image_size(model: nn.Module) -> int:
    """``model.embed_image_size`` when a loader recorded one, else 224."""
    return getattr(model, "embed_image_size", None) or DEFAULT_IMAGE_SIZE


def resolve_view(
    model: nn.Module, image_size: int | None, resize_ratio: float | str | None
) -> tuple[int, float | None]:
    """The eval view to embed with: the requested one, else the model's recorded one, else 224 and 256/224.

    Logs a warning when the requested size differs from the size the model recorded."""
    recorded = getattr(model, "embed_image_size", None)
    if image_size is not None and recorded is not None and image_size != recorded:
        logger.warning(
            "embedding at %d px, but this model was trained and evaluated at %d px (its recorded input size)",
            image_size,
            recorded,
        )
    size = image_size if image_size is not None else default_image_size(model)
    if resize_ratio == RECORDED:
        ratio = getattr(model, "embed_resize_ratio", None)
        resize_ratio = ratio if ratio is not None else DEFAULT_RESIZE_RATIO
    elif isinstance(resize_ratio, str):
        raise ConfigError(f"resize_ratio must be a number >= 1, None or {RECORDED!r}, got {resize_ratio!r}")
    return size, resize_ratio


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
        return to_rgb(item)
    path = Path(item)
    if not path.is_file():
        raise DataError(f"image file {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"cannot read image {str(path)!r}: {error}") from None


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _pil_batches(items: list[Any], batch_size: int, image_size: int, resize_ratio: float) -> Iterable[Tensor]:
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
    resize_ratio: float | str | None = RECORDED,
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
            means no zoom-in; ``"recorded"`` (default): the checkpoint's recorded ratio, else 256/224.
        batch_size: images per forward pass.
        normalize: L2-normalise each row of the result.

    Returns:
        ``(N, D)`` float32 embeddings on the CPU, in input order, computed under ``no_grad`` in eval mode
        (the model's previous train/eval mode is restored).
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size}")
    size, resize_ratio = resolve_view(model, image_size, resize_ratio)
    check_resize_ratio(resize_ratio)
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


def check_resize_ratio(resize_ratio: float | str | None) -> None:
    if resize_ratio is None or resize_ratio == RECORDED:
        return
    if isinstance(resize_ratio, str) or not (math.isfinite(resize_ratio) and 1.0 <= resize_ratio <= 8.0):
        raise ConfigError(
            f"resize ratio must be a number from 1 (no zoom-in) to 8, got {resize_ratio}; the default is "
            f"{DEFAULT_RESIZE_RATIO:.4f} (256/224)"
        )
