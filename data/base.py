"""The dataset contract shared by every reader.

A reader returns ``DatasetSplits``: image collections whose items are *untransformed* RGB PIL images with an
integer label. Transforms (train views, eval crop) are applied by wrappers in ``dmlkd.data.transforms`` so the
same collection serves training, evaluation and the teacher cache. ``identifiers`` are stable strings
(relative paths, or ``glyphs:<char>:<face>:<k>``) used to key caches and to name bad files in errors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dmlkd.data.decode import ImageSource, open_image_file
from dmlkd.errors import DataError

_ALPHA_MODES = {"RGBA": "RGBA", "LA": "LA", "PA": "RGBA", "La": "LA", "RGBa": "RGBA"}


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB image of whatever mode PIL opened ``image`` in.

    ``convert("RGB")`` alone clips high-bit-depth pixels instead of scaling them (a 16-bit PNG becomes almost
    white), so integer modes are scaled by their range: ``I;16*`` by 65535, ``I`` by 65535 when its values fit
    16 bits (how PIL opens 16-bit PNGs) and by its own maximum otherwise; ``F`` is taken as [0, 1] when its
    values lie there, as 0-255 when they lie there, and scaled min-max otherwise. Transparent pixels (alpha
    modes, palettes with a transparent colour) are composited over white; CMYK, YCbCr, LAB and HSV are
    converted by PIL.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if values.ndim == 3:  # a multi-channel high-bit-depth image PIL exposes as one array
            values = values[..., 0]
        high = float(values.max()) if values.size else 0.0
        low = float(values.min()) if values.size else 0.0
        if mode.startswith("I;16"):
            scaled = values / 65535.0
        elif mode == "I":
            scaled = np.clip(values, 0, None) / (65535.0 if high <= 65535 else high)
        elif low >= 0.0 and high <= 1.0:
            scaled = values
        elif low >= 0.0 and high <= 255.0:
            scaled = values / 255.0
        else:
            scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
        gray = np.rint(np.nan_to_num(scaled, nan=0.0) * 255.0).clip(0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert(_ALPHA_MODES[mode]).convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class ImageCollection:
    """A labelled, indexable set of images. Subclasses implement ``load`` (and may override ``open``).

    ``class_names`` maps a label to its human-readable name where the dataset has one (a glyph's character,
    a class folder's name, an annotation file's class name); ``class_name(label)`` falls back to the number.
    """

    def __init__(
        self,
        identifiers: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        class_names: Mapping[int, str] | None = None,
    ) -> None:
        if len(identifiers) != len(labels):
            raise ValueError("identifiers and labels differ in length")
        self.identifiers = list(identifiers)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names: dict[int, str] = {int(k): str(v) for k, v in (class_names or {}).items()}

    def class_name(self, label: int) -> str:
        """The name of class ``label``, or the label as a string when the dataset names no classes."""
        return self.class_names.get(int(label), str(int(label)))

    def __len__(self) -> int:
        return len(self.identifiers)

    def load(self, index: int) -> Image.Image:
        """The RGB image at ``index``; a corrupt or unreadable file is a ``DataError`` naming it."""
        raise NotImplementedError

    def open(self, index: int) -> ImageSource:
        """The image at ``index`` as an ``ImageSource`` (JPEG files: header read, pixels decoded on demand)."""
        return ImageSource(self.load(index))

    @property
    def num_classes(self) -> int:
        return len(np.unique(self.labels))


class FileImageCollection(ImageCollection):
    """Images stored as files under ``root``; identifiers are paths relative to ``root``."""

    def __init__(
        self,
        root: Path,
        relpaths: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        class_names: Mapping[int, str] | None = None,
    ) -> None:
        super().__init__(relpaths, labels, class_names)
        self.root = Path(root)

    def path(self, index: int) -> Path:
        return self.root / self.identifiers[index]

    def load(self, index: int) -> Image.Image:
        path = self.path(index)
        try:
            with Image.open(path) as image:
                image.load()
                return to_rgb(image)
        except FileNotFoundError:
            raise DataError(f"image file {str(path)!r} does not exist") from None
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise DataError(f"cannot read image {str(path)!r}: {error}; fix or remove the file") from None

    def open(self, index: int) -> ImageSource:
        return open_image_file(self.path(index))


class ArrayImageCollection(ImageCollection):
    """Images held in memory as a ``(N, H, W)`` or ``(N, H, W, 3)`` uint8 array."""

    def __init__(
        self,
        images: np.ndarray,
        identifiers: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        class_names: Mapping[int, str] | None = None,
    ) -> None:
        super().__init__(identifiers, labels, class_names)
        self.images = images

    def load(self, index: int) -> Image.Image:
        return to_rgb(Image.fromarray(self.images[index]))


class Subset(ImageCollection):
    """A view of another collection restricted to ``positions`` (e.g. after skipping bad files)."""

    def __init__(self, base: ImageCollection, positions: Sequence[int]) -> None:
        super().__init__([base.identifiers[i] for i in positions], base.labels[list(positions)], base.class_names)
        self.base = base
        self.positions = list(positions)

    def load(self, index: int) -> Image.Image:
        return self.base.load(self.positions[index])

    def open(self, index: int) -> ImageSource:
        return self.base.open(self.positions[index])


@dataclass
class DatasetSplits:
    """The splits of one dataset.

    ``train`` and ``test`` are always set; for a query/gallery protocol (In-shop, or a CSV with
    ``is_query``/``is_gallery``) ``query`` and ``gallery`` are set as well and evaluation uses them instead of
    leave-one-out retrieval on ``test``. ``recall_ks`` are the K values the field reports for this dataset.
    ``defaults`` holds recommended transform settings (``image_size``, ``crop_scale``) for small datasets.
    """

    name: str
    train: ImageCollection
    test: ImageCollection
    query: ImageCollection | None = None
    gallery: ImageCollection | None = None
    recall_ks: tuple[int, ...] = (1, 2, 4, 8)
    defaults: dict[str, Any] = field(default_factory=dict)
