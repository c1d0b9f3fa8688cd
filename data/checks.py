"""Image integrity checks and dataset summaries.

``find_bad_images`` decodes every image of a collection (``verify`` alone misses truncated JPEGs, so each file
is also fully loaded); ``drop_bad_images`` implements the "skip and report bad files" option by replacing
each split with a ``Subset`` of its readable images. ``describe`` gives the image and class counts per split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
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


def _real_paths(collection: FileImageCollection) -> list[str]:
    """Resolved paths of a collection's files (links resolved once per folder, not once per file)."""
    folders: dict[str, str] = {}
    paths = []
    for index in range(len(collection)):
        head, tail = os.path.split(os.path.join(collection.root, collection.identifiers[index]))
        if head not in folders:
            folders[head] = os.path.realpath(head)
        paths.append(os.path.join(folders[head], tail))
    return paths


def _content_groups(entries: list[tuple[str, str, str]]) -> list[list[tuple[str, str, str]]]:
    """Groups of ``(split, identifier, path)`` with identical bytes; only files sharing a size are hashed."""
    by_size: dict[int, list[tuple[str, str, str]]] = {}
    for entry in entries:
        try:
            by_size.setdefault(os.stat(entry[2]).st_size, []).append(entry)
        except OSError:
            continue  # missing files are reported by the readers and the image checks
    groups = [group for group in by_size.values() if len(group) > 1]
    for limit in (1 << 16, None):  # the first 64 KiB of same-size files, then whole files where those agree
        refined = []
        for group in groups:
            by_digest: dict[str, list[tuple[str, str, str]]] = {}
            for entry in group:
                with open(entry[2], "rb") as handle:
                    data = handle.read() if limit is None else handle.read(limit)
                by_digest.setdefault(hashlib.sha256(data).hexdigest(), []).append(entry)
            refined += [same for same in by_digest.values() if len(same) > 1]
        groups = refined
    return groups


def check_duplicates(splits: DatasetSplits, by_content: bool = False) -> None:
    """Refuse the same image twice within train or test, or in both (by resolved path; by bytes if asked).

    An image listed twice counts twice in training and finds itself at rank 1 in evaluation, so Recall@1 of
    even an untrained model reaches 100 %. ``data.allow_duplicates=true`` accepts them knowingly.

    Raises:
        DataError: naming the number of duplicates and the first offenders.
    """
    entries: list[tuple[str, str, str]] = []
    for split in ("train", "test"):
        collection = getattr(splits, split)
        if isinstance(collection, FileImageCollection):
            entries += [(split, ident, path) for ident, path in zip(collection.identifiers, _real_paths(collection))]
    seen: dict[str, tuple[str, str]] = {}
    problems: list[str] = []
    for split, ident, path in entries:
        if path in seen:
            first_split, first = seen[path]
            where = f"twice in {split}" if first_split == split else f"in both {first_split} and {split}"
            same = f"{first!r}" if first == ident else f"{first!r} and {ident!r} (the same file)"
            problems.append(f"{same} {where}")
        else:
            seen[path] = (split, ident)
    if by_content and not problems:
        for group in _content_groups([(s, i, p) for p, (s, i) in seen.items()]):
            (split_a, first, _), (split_b, second, _) = group[0], group[1]
            where = f"both in {split_a}" if split_a == split_b else f"in {split_a} and {split_b}"
            problems.append(f"{first!r} and {second!r} have the same content ({where})")
    if problems:
        raise DataError(
            f"dataset {splits.name!r}: {len(problems):,} duplicate image(s), first {problems[0]}; an image listed "
            "twice inflates Recall@K (it retrieves itself): remove the duplicates, or pass "
            "--set data.allow_duplicates=true to keep them knowingly"
        )
