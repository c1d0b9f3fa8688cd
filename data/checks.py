"""Image integrity checks and dataset summaries.

``find_bad_images`` decodes every image of a collection (``verify`` alone misses truncated JPEGs, so each file
is also fully loaded); ``drop_bad_images`` implements the "skip and report bad files" option by replacing
each split with a ``Subset`` of its readable images. ``describe`` gives the image and class counts per split.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from dmlkd.data.base import DatasetSplits, FileImageCollection, ImageCollection, Subset
from dmlkd.errors import DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "test", "query", "gallery")


def _problem(collection: ImageCollection, index: int) -> str | None:
    """Why the image at ``index`` is unusable, or ``None`` when it opens, verifies and fully decodes."""
    if isinstance(collection, FileImageCollection):
        try:
            with Image.open(collection.path(index)) as image:
                image.verify()
        except FileNotFoundError:
            return f"image file {str(collection.path(index))!r} does not exist"
        except Exception as error:  # PIL raises many error types on corrupt data
            return f"corrupt image {str(collection.path(index))!r}: {type(error).__name__}: {error}"
    try:
        collection.load(index)
    except DataError as error:
        return str(error)
    except Exception as error:  # a broken decoder must be reported, not crash the scan
        return f"cannot decode {collection.identifiers[index]!r}: {type(error).__name__}: {error}"
    return None


def _bad_positions(collection: ImageCollection, workers: int) -> dict[int, str]:
    """Positions of unusable images in ``collection`` mapped to the reason."""
    indices = range(len(collection))
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decoding releases the GIL
            reasons = list(pool.map(lambda index: _problem(collection, index), indices))
    else:
        reasons = [_problem(collection, index) for index in indices]
    return {index: reason for index, reason in enumerate(reasons) if reason is not None}


def find_bad_images(collection: ImageCollection, workers: int = 0) -> list[tuple[str, str]]:
    """Open and fully decode every image of ``collection``.

    Args:
        collection: any image collection; file-backed ones are also checked with PIL ``verify``.
        workers: threads used for decoding (0 or 1: in this thread).

    Returns:
        ``(identifier, reason)`` for each image that cannot be used, in collection order.
    """
    return [(collection.identifiers[i], reason) for i, reason in _bad_positions(collection, workers).items()]


def _bad_positions_cached(collection: ImageCollection, cache: dict[int, dict[int, str]], workers: int):
    """Like ``_bad_positions`` but reuses the result of an already scanned base for a ``Subset`` view."""
    if id(collection) not in cache:
        if isinstance(collection, Subset) and id(collection.base) in cache:
            base_bad = cache[id(collection.base)]
            positions = collection.positions
            cache[id(collection)] = {i: base_bad[p] for i, p in enumerate(positions) if p in base_bad}
        else:
            cache[id(collection)] = _bad_positions(collection, workers)
    return cache[id(collection)]


def drop_bad_images(splits: DatasetSplits, workers: int = 0) -> tuple[DatasetSplits, list[tuple[str, str]]]:
    """Scan every split and drop unusable images (the "skip and report bad files" option).

    ``query``/``gallery`` that are views of ``test`` are not decoded twice. Splits without bad images are
    returned unchanged; others become a ``Subset`` of their readable images.

    Returns:
        The cleaned splits and the ``(identifier, reason)`` of every dropped image (each identifier once).

    Raises:
        DataError: a split has no readable image left.
    """
    cache: dict[int, dict[int, str]] = {}
    replaced: dict[str, ImageCollection] = {}
    report: dict[str, str] = {}
    for split in SPLITS:
        collection = getattr(splits, split)
        if collection is None:
            continue
        bad = _bad_positions_cached(collection, cache, workers)
        if not bad:
            continue
        for index, reason in bad.items():
            report.setdefault(collection.identifiers[index], reason)
        kept = [index for index in range(len(collection)) if index not in bad]
        if not kept:
            raise DataError(f"dataset {splits.name!r}: none of the {len(collection):,} {split} images is readable")
        replaced[split] = Subset(collection, kept)
    if report:
        logger.warning(
            "dataset %s: skipped %d unreadable image(s), first %s",
            splits.name,
            len(report),
            next(iter(report)),
        )
    return dataclasses.replace(splits, **replaced), list(report.items())


def describe(splits: DatasetSplits) -> dict[str, Any]:
    """Image and class counts per split.

    Returns:
        ``{"dataset": name, "recall_ks": [...], "splits": {split: {"images": n, "classes": c}}}`` with only
        the splits that are set (``query``/``gallery`` for a query/gallery protocol).
    """
    counts = {}
    for split in SPLITS:
        collection = getattr(splits, split)
        if collection is not None:
            counts[split] = {"images": len(collection), "classes": collection.num_classes}
    return {"dataset": splits.name, "recall_ks": list(splits.recall_ks), "splits": counts}
