"""Opening image files so that training views can decode JPEGs at reduced size (DCT scaling).

A JPEG can be decoded at 1/2, 1/4 or 1/8 of its size for little more than the entropy decoding: the inverse DCT
produces the smaller image directly. ``open_image_file`` reads the file and its header and returns an
``ImageSource`` whose ``decode(scale)`` does that. The decoder is simplejpeg (libjpeg-turbo; install
``dmlkd[fastjpeg]``) when it is installed, else Pillow's draft mode, which is also libjpeg-turbo but ~1.6x
slower per image here (bench/data_throughput.py). Other formats, and JPEGs either decoder refuses (CMYK),
are decoded in full by Pillow (``actual`` scale 1).

Sizes follow libjpeg: decoding a ``W`` x ``H`` image at ``1/s`` gives ``ceil(W/s)`` x ``ceil(H/s)`` pixels,
and source pixel coordinate ``x`` maps to ``x / s`` (each output pixel covers ``s`` x ``s`` source pixels), so
crop boxes map exactly (``dmlkd.data.transforms``).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from dmlkd.errors import DataError

try:  # optional: dmlkd[fastjpeg]
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None

SCALES = (1, 2, 4, 8)


class ImageSource:
    """One image, opened but possibly not yet decoded: ``size`` is known, ``decode(scale)`` gives the pixels.

    ``decode(scale)`` returns ``(image, actual)``: the RGB image decoded at ``1 / actual`` of its size on each
    axis (``ceil(W / actual)`` x ``ceil(H / actual)``), where ``actual`` is ``scale`` when the format can
    decode at reduced size (JPEG DCT scaling by 2, 4 or 8) and 1 otherwise. This base class holds an already
    decoded image and always answers ``actual = 1``.
    """

    def __init__(self, image: Image.Image) -> None:
        self.image = image
        self.size = image.size

    def decode(self, scale: int = 1) -> tuple[Image.Image, int]:
        return self.image, 1


def decoder_name() -> str:
    """The JPEG decoder in use and its version (part of the teacher cache key: decoders round differently)."""
    if simplejpeg is not None:
        return f"simplejpeg {getattr(simplejpeg, '__version__', '?')}"
    import PIL

    return f"pillow {PIL.__version__}"


def _bad_file(path: Path, error: Exception) -> DataError:
    return DataError(f"cannot read image {str(path)!r}: {error}; fix or remove the file")


class JpegSource(ImageSource):
    """A JPEG file's bytes and size; ``decode(scale)`` decodes at ``1/scale`` (1, 2, 4 or 8)."""

    def __init__(self, path: Path, data: bytes, size: tuple[int, int]) -> None:
        self.path, self.data, self.size = path, data, size
        self.image = None

    def decode(self, scale: int = 1) -> tuple[Image.Image, int]:
        if scale not in SCALES:
            raise ValueError(f"JPEG decode scale must be one of {SCALES}, got {scale}")
        width, height = self.size
        expected = (math.ceil(height / scale), math.ceil(width / scale))
        if simplejpeg is not None:
            try:
                array = simplejpeg.decode_jpeg(
                    self.data, colorspace="RGB", min_height=expected[0], min_width=expected[1]
                )
            except ValueError:
                array = None  # e.g. CMYK: Pillow converts it below
            if array is not None and array.shape[:2] == expected:
                return Image.fromarray(array), scale
        return self._decode_pillow(scale)

    def _decode_pillow(self, scale: int) -> tuple[Image.Image, int]:
        try:
            with Image.open(io.BytesIO(self.data)) as image:
                actual = 1
                if scale > 1:
                    result = image.draft("RGB", (self.size[0] // scale, self.size[1] // scale))
                    actual = round(self.size[0] / result[1][2]) if result else 1
                image.load()
                rgb = image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise _bad_file(self.path, error) from None
        if actual not in SCALES or rgb.size != (math.ceil(self.size[0] / actual), math.ceil(self.size[1] / actual)):
            raise _bad_file(self.path, ValueError(f"unexpected reduced decode {rgb.size} at scale {actual}"))
        return rgb, actual


def open_image_file(path: Path) -> ImageSource:
    """The file's ``ImageSource``: a ``JpegSource`` for JPEG files, else the fully decoded RGB image."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"image file {str(path)!r} does not exist") from None
    except OSError as error:
        raise _bad_file(path, error) from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "JPEG" and image.mode in ("RGB", "L"):
                return JpegSource(Path(path), data, image.size)
            image.load()
            return ImageSource(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise _bad_file(path, error) from None


def as_uint8_array(image: Image.Image) -> np.ndarray:
    """``(H, W, 3)`` uint8, writable (torch refuses read-only buffers)."""
    return np.array(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8, copy=True)
