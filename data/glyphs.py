"""The built-in ``glyphs`` demo dataset: letters and digits rendered from the fonts matplotlib ships.

Classes are the letters and digits that all 16 text faces cover and that have no Unicode decomposition
(about 345 candidates: digits, Latin, IPA, Greek, Cyrillic). Homoglyphs across scripts (Latin A, Greek Α,
Cyrillic А, ...) are found by comparing undistorted renders face by face: a candidate is dropped when any face
draws it (nearly) identically to a character already kept, scanning in codepoint order, so the lowest
codepoint of each look-alike group survives (about 284 classes remain). Every instance is one face times
``renders_per_face`` seeded random distortions (scale, rotation, shift, stroke width). Classes are sorted by
codepoint and split in halves: the first half trains, the second half tests (zero-shot retrieval).

Rendering is deterministic in ``seed`` and cached as one ``.npz`` file keyed by everything it depends on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import unicodedata
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import matplotlib
import numpy as np
import PIL
from matplotlib.ft2font import FT2Font
from PIL import Image, ImageDraw, ImageFont

from dmlkd.data.base import ArrayImageCollection, DatasetSplits
from dmlkd.errors import ConfigError, DataError
from dmlkd.paths import cache_folder
from dmlkd.registry import DATASETS

logger = logging.getLogger(__name__)

FACES = (
    "DejaVuSans",
    "DejaVuSans-Bold",
    "DejaVuSans-Oblique",
    "DejaVuSans-BoldOblique",
    "DejaVuSansMono",
    "DejaVuSansMono-Bold",
    "DejaVuSansMono-Oblique",
    "DejaVuSansMono-BoldOblique",
    "DejaVuSerif",
    "DejaVuSerif-Bold",
    "DejaVuSerif-Italic",
    "DejaVuSerif-BoldItalic",
    "STIXGeneral",
    "STIXGeneralBol",
    "STIXGeneralItalic",
    "STIXGeneralBolIta",
)
DEFAULT_FACE = FACES[0]
CODE_VERSION = 1  # bump whenever a change alters the rendered pixels or the class list
HOMOGLYPH_THRESHOLD = 0.02  # normalised L1 distance below which two renders count as the same drawing
DETECT_SIZE = 32  # homoglyphs are detected at a fixed size so the class list never depends on render_size
_SUPERSAMPLE = 4  # render at 4x and box-downsample: anti-aliasing and sub-pixel stroke widths
_CAP_FRACTION = 0.5  # undistorted cap height ("H") as a fraction of the image side


@dataclass(frozen=True)
class GlyphOptions:
    """Options of the ``glyphs`` builder (``max_classes`` keeps the first classes, for fast tests)."""

    render_size: int = 32
    renders_per_face: int = 2
    seed: int = 0
    max_classes: int | None = None

    def __post_init__(self) -> None:
        minimums = {"render_size": 8, "renders_per_face": 1, "seed": 0, "max_classes": 2}
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if value is None and name == "max_classes":
                continue
            if value < minimum:  # the registry has checked the types
                raise ConfigError(f"glyphs option {name}={value!r} is invalid; expected an integer >= {minimum}")


@dataclass(frozen=True)
class Distortion:
    """One random render distortion; ``shift_*`` are fractions of the image side, ``stroke`` in 1/4 px."""

    scale: float = 1.0
    angle: float = 0.0
    shift_x: float = 0.0
    shift_y: float = 0.0
    stroke: int = 0


def sample_distortion(rng: np.random.Generator) -> Distortion:
    """Scale 0.7-1.0, rotation within +-10 degrees, shift within +-1/16 of the side, stroke 0-0.5 px."""
    return Distortion(
        scale=float(rng.uniform(0.7, 1.0)),
        angle=float(rng.uniform(-10.0, 10.0)),
        shift_x=float(rng.uniform(-1 / 16, 1 / 16)),
        shift_y=float(rng.uniform(-1 / 16, 1 / 16)),
        stroke=int(rng.integers(0, 3)),
    )


def font_paths() -> list[Path]:
    """The 16 TrueType files, in ``FACES`` order; a missing one is a ``DataError``."""
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    paths = [folder / f"{face}.ttf" for face in FACES]
    for path in paths:
        if not path.is_file():
            raise DataError(f"font file {str(path)!r} is missing; the glyphs dataset needs matplotlib's fonts")
    return paths


def candidate_codepoints(paths: list[Path]) -> list[int]:
    """Letters and digits (categories L*, N*) that every face covers and that have no decomposition."""
    common = set.intersection(*(set(FT2Font(str(path)).get_charmap()) for path in paths))
    return [
        code
        for code in sorted(common)
        if unicodedata.category(chr(code))[0] in "LN" and not unicodedata.decomposition(chr(code))
    ]


class GlyphRenderer:
    """Renders single characters of the 16 faces as ``(size, size)`` uint8 arrays, dark ink on white."""

    def __init__(self, paths: list[Path], size: int) -> None:
        self.size = size
        canvas = size * _SUPERSAMPLE
        self._fonts = []
        self._cap_centres = []
        for path in paths:
            probe = ImageFont.truetype(str(path), 100)
            cap_top = -probe.getbbox("H", anchor="ls")[1]
            font = ImageFont.truetype(str(path), max(1, round(100 * _CAP_FRACTION * canvas / cap_top)))
            top, bottom = font.getbbox("H", anchor="ls")[1::2]
            self._fonts.append(font)
            self._cap_centres.append((top + bottom) / 2)

    def render(self, face: int, code: int, distortion: Distortion | None = None) -> np.ndarray:
        """Draw ``chr(code)`` with face ``face``: cap height centred, ink box centred horizontally."""
        canvas = self.size * _SUPERSAMPLE
        font = self._fonts[face]
        stroke = distortion.stroke if distortion else 0
        image = Image.new("L", (canvas, canvas), 0)
        left, _, right, _ = font.getbbox(chr(code), anchor="ls", stroke_width=stroke)
        origin = (canvas / 2 - (left + right) / 2, canvas / 2 - self._cap_centres[face])
        ImageDraw.Draw(image).text(
            origin, chr(code), fill=255, font=font, anchor="ls", stroke_width=stroke, stroke_fill=255
        )
        if distortion is not None:
            image = image.transform(
                image.size,
                Image.Transform.AFFINE,
                _inverse_affine(distortion, canvas),
                Image.Resampling.BILINEAR,
            )
        return 255 - np.asarray(image.reduce(_SUPERSAMPLE))


def _inverse_affine(distortion: Distortion, canvas: int) -> tuple[float, ...]:
    """PIL's output-to-input map of: scale and rotate about the centre, then shift."""
    centre = canvas / 2
    radians = np.deg2rad(distortion.angle)
    cos, sin = np.cos(radians) / distortion.scale, np.sin(radians) / distortion.scale
    out_x, out_y = centre + distortion.shift_x * canvas, centre + distortion.shift_y * canvas
    return (cos, sin, centre - cos * out_x - sin * out_y, -sin, cos, centre + sin * out_x - cos * out_y)


def _ink(renders: np.ndarray) -> np.ndarray:
    return (255.0 - renders.reshape(*renders.shape[:-2], -1).astype(np.float32)) / 255.0


def select_classes(renderer: GlyphRenderer, candidates: list[int], max_classes: int | None) -> list[int]:
    """Keep candidates in codepoint order unless some face draws them like an already kept one.

    The distance of two renders is ``sum |a - b| / (sum a + sum b)`` on ink intensities; pairs below
    ``HOMOGLYPH_THRESHOLD`` in any face are look-alikes (true homoglyphs score 0.00-0.01, the closest
    distinct pairs such as O/Q or D/Ð score about 0.03-0.05 in most faces).
    """
    kept: list[int] = []
    kept_ink = np.empty((len(candidates), len(FACES), renderer.size**2), np.float32)
    kept_sum = np.empty((len(candidates), len(FACES)), np.float32)
    for code in candidates:
        if max_classes is not None and len(kept) >= max_classes:
            break
        ink = _ink(np.stack([renderer.render(face, code) for face in range(len(FACES))]))  # (F, S*S)
        total = ink.sum(-1)
        sums = kept_sum[: len(kept)] + total + 1e-6
        # |sum a - sum b| bounds sum |a - b| from below: only close pairs need the pixel comparison.
        close = np.flatnonzero((np.abs(kept_sum[: len(kept)] - total) / sums < HOMOGLYPH_THRESHOLD).any(-1))
        distance = np.abs(kept_ink[close] - ink).sum(-1) / sums[close]
        if distance.size and distance.min() < HOMOGLYPH_THRESHOLD:
            continue
        kept_ink[len(kept)], kept_sum[len(kept)] = ink, total
        kept.append(code)
    return kept


def render_instances(renderer: GlyphRenderer, codes: list[int], renders_per_face: int, seed: int) -> np.ndarray:
    """``(C, F, R, S, S)`` uint8 renders; distortion ``(c, f, k)`` depends only on (seed, codepoint, f, k)."""
    out = np.empty((len(codes), len(FACES), renders_per_face, renderer.size, renderer.size), np.uint8)
    for c, code in enumerate(codes):
        for face in range(len(FACES)):
            for k in range(renders_per_face):
                rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(code, face, k)))
                out[c, face, k] = renderer.render(face, code, sample_distortion(rng))
    return out


def cache_key(paths: list[Path], candidates: list[int], options: GlyphOptions) -> str:
    """Hash of every input of the renders: font bytes, candidates, options, code and FreeType versions."""
    payload = {
        "fonts": [hashlib.sha256(path.read_bytes()).hexdigest() for path in paths],
        "candidates": candidates,
        "options": [getattr(options, item.name) for item in fields(options)],
        "code_version": CODE_VERSION,
        "pillow": PIL.__version__,
        "freetype": ImageFont.core.freetype2_version,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def load_cache(path: Path, key: str) -> tuple[np.ndarray, list[int]] | None:
    """The cached ``(renders, codepoints)``, or None when the file is absent, corrupt or for another key."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            stored_key, renders, codes = str(data["key"]), data["renders"], data["codepoints"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        logger.warning("glyph cache %s is unreadable (%s); rendering again", path, error)
        return None
    if stored_key != key or renders.ndim != 5 or renders.shape[0] != len(codes) or renders.dtype != np.uint8:
        logger.warning("glyph cache %s does not match its key; rendering again", path)
        return None
    return renders, [int(code) for code in codes]


def save_cache(path: Path, key: str, renders: np.ndarray, codes: list[int]) -> None:
    """Write atomically (temporary file in the same folder, then ``os.replace``); failures only warn."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                np.savez_compressed(file, key=np.array(key), renders=renders, codepoints=np.array(codes))
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    except OSError as error:
        logger.warning("cannot write glyph cache %s (%s); continuing without it", path, error)


def glyph_arrays(root: str | Path | None, options: GlyphOptions) -> tuple[np.ndarray, list[int]]:
    """The ``(C, F, R, S, S)`` renders and the class codepoints, from the cache or freshly rendered."""
    paths = font_paths()
    candidates = candidate_codepoints(paths)
    key = cache_key(paths, candidates, options)
    path = cache_folder(root) / f"glyphs-{key}.npz"
    start = time.perf_counter()
    cached = load_cache(path, key)
    if cached is not None:
        logger.info("glyphs: loaded %s in %.2f s", path, time.perf_counter() - start)
        return cached
    codes = select_classes(GlyphRenderer(paths, DETECT_SIZE), candidates, options.max_classes)
    renderer = GlyphRenderer(paths, options.render_size)
    renders = render_instances(renderer, codes, options.renders_per_face, options.seed)
    logger.info("glyphs: rendered %d images in %.2f s", renders[..., 0, 0].size, time.perf_counter() - start)
    save_cache(path, key, renders, codes)
    return renders, codes


def _collection(renders: np.ndarray, codes: list[int], first_label: int) -> ArrayImageCollection:
    classes, faces, repeats = renders.shape[:3]
    identifiers = [
        f"glyphs:U+{code:04X}:{face}:{k}" for code in codes for face in FACES[:faces] for k in range(repeats)
    ]
    labels = np.repeat(np.arange(first_label, first_label + classes), faces * repeats)
    names = {first_label + i: chr(code) for i, code in enumerate(codes)}  # each class is one character
    return ArrayImageCollection(renders.reshape(-1, *renders.shape[3:]), identifiers, labels, names)


@DATASETS.register("glyphs")
def build_glyphs(
    root: str | Path | None = None,
    *,
    render_size: int = 32,
    renders_per_face: int = 2,
    seed: int = 0,
    max_classes: int | None = None,
) -> DatasetSplits:
    """Letters and digits rendered from matplotlib's fonts (demo data; no download, cached on first use).

    ``root`` overrides the cache folder; the options are those of ``GlyphOptions``.

    Labels are class positions in codepoint order: train ``0..C/2-1``, test ``C/2..C-1``. Images are
    grayscale ``(S, S)`` uint8 arrays (``load`` returns RGB).
    """
    options = GlyphOptions(render_size, renders_per_face, seed, max_classes)
    renders, codes = glyph_arrays(root, options)
    half = len(codes) // 2
    size = renders.shape[-1]
    return DatasetSplits(
        name="glyphs",
        train=_collection(renders[:half], codes[:half], 0),
        test=_collection(renders[half:], codes[half:], half),
        recall_ks=(1, 2, 4, 8),
        # Glyphs fill the central half of the image: mild crops keep them in view, the eval crop must not
        # zoom in, and a mirror image is another letter (b/d, p/q), so no flips.
        defaults={"image_size": size, "crop_scale": (0.6, 1.0), "eval_resize_ratio": 1.0, "flip_p": 0.0},
    )
