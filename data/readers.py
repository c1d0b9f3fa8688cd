"""Dataset readers: the four public DML benchmarks, a class-per-folder tree and a CSV list of images.

Each reader is registered in ``dmlkd.registry.DATASETS`` and called as ``reader(root, **options)``; it returns
``DatasetSplits`` of untransformed images. Splits follow the official code (seed-spec §6): CUB and Cars are
split by class (first half train), SOP reads ``Ebay_train.txt``/``Ebay_test.txt``, and In-shop has a
query/gallery protocol. The public readers check the image and class counts against the official split by
default (``verify_counts=True``), since a partial or wrong download is the most common reproduction bug.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dmlkd.data.annotations import CsvTable as CsvTable
from dmlkd.data.annotations import (
    load_cars_annotations,
    load_cars_class_names,
    read_csv_table,
    read_partition,
    read_sop_list,
    remap_labels,
)
from dmlkd.data.base import DatasetSplits, FileImageCollection, ImageCollection, Subset
from dmlkd.errors import ConfigError, DataError
from dmlkd.registry import DATASETS

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})

# split -> (images, classes); None = not checked. In-shop "test" is query followed by gallery.
OFFICIAL_COUNTS: dict[str, dict[str, tuple[int, int | None]]] = {
    "cub": {"train": (5_864, 100), "test": (5_924, 100)},
    "cars": {"train": (8_054, 98), "test": (8_131, 98)},
    "sop": {"train": (59_551, 11_318), "test": (60_502, 11_316)},
    "inshop": {
        "train": (25_882, 3_997),
        "query": (14_218, None),
        "gallery": (12_612, None),
        "test": (26_830, 3_985),
    },
}


HOW_TO_GET = {
    "cub": "extract CUB_200_2011.tgz (https://www.vision.caltech.edu/datasets/cub_200_2011/) there",
    "cars": "put cars_annos.mat and the extracted car_ims.tgz of Stanford Cars (Krause et al. 2013) in a "
    "cars196 folder there",
    "sop": "unzip Stanford_Online_Products.zip (https://cvgl.stanford.edu/projects/lifted_struct/) there",
    "inshop": "put the DeepFashion In-shop Clothes Retrieval benchmark (Eval/list_eval_partition.txt and "
    "Img/img.zip) in an Inshop_Clothes folder there",
}


def _dataset_dir(name: str, root: str | Path | None, folder: str, marker: str) -> Path:
    """``root/folder``, or ``root`` itself when it already is that folder (it holds ``marker``)."""
    if root is None:
        raise DataError(f"dataset {name!r} needs a data root (the folder that contains {folder}/); {HOW_TO_GET[name]}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"{name} data root {str(root)!r} does not exist or is not a folder; expected a folder containing "
            f"{folder}/; {HOW_TO_GET[name]}"
        )
    for candidate in (root / folder, root):
        if (candidate / marker).exists():
            return candidate
    expected = root / marker if root.name == folder else root / folder / marker
    raise DataError(f"{name}: {str(expected)!r} does not exist; {HOW_TO_GET[name]}")


def _require_file(name: str, path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"{name}: annotation file {str(path)!r} does not exist; {HOW_TO_GET[name]}")
    return path


def verify_official_counts(name: str, found: dict[str, ImageCollection], where: Path, hint: str = "") -> None:
    """Raise ``DataError`` with expected and found counts per split if any differ from the official ones."""
    rows, wrong = [], False
    for split, (images, classes) in OFFICIAL_COUNTS[name].items():
        found_images, found_classes = len(found[split]), found[split].num_classes
        wrong |= found_images != images or (classes is not None and found_classes != classes)
        expected_classes = "" if classes is None else f" / {classes:,} classes"
        rows.append(
            f"{split}: expected {images:,} images{expected_classes}, "
            f"found {found_images:,} images / {found_classes:,} classes"
        )
    if wrong:
        raise DataError(
            f"{name} under {str(where)!r} does not match the official split ({'; '.join(rows)}){hint}; "
            "check the download and layout, or pass verify_counts=False for a custom subset"
        )


def _check_nonempty(name: str, found: dict[str, ImageCollection], where: Path) -> None:
    for split, collection in found.items():
        if len(collection) == 0:
            raise DataError(f"{name}: no {split} images found under {str(where)!r}")


def _check_listed(name: str, collection: FileImageCollection, source: str) -> None:
    """Spot-check that the first and last listed images exist (catches images that were never extracted)."""
    for index in sorted({0, len(collection) - 1}):
        if not collection.path(index).is_file():
            raise DataError(
                f"{name}: image {str(collection.path(index))!r} listed in {source} does not exist; {HOW_TO_GET[name]}"
            )


def _split_by_class(
    base: Path, relpaths: list[str], labels: np.ndarray, first_test: int, names: dict[int, str] | None = None
) -> dict[str, FileImageCollection]:
    """Train = labels below ``first_test``, test = the rest; labels are kept as they are (not remapped)."""
    is_train = labels < first_test
    found = {}
    for split, mask in (("train", is_train), ("test", ~is_train)):
        chosen = np.flatnonzero(mask)
        found[split] = FileImageCollection(base, [relpaths[i] for i in chosen], labels[chosen], names)
    return found


def _raw_names(raw: list[Any], labels: np.ndarray) -> dict[int, str]:
    """``{label: the raw label it was remapped from}`` (a CSV's class names)."""
    return {int(label): str(value) for value, label in zip(raw, labels.tolist())}


def _folder_names(relpaths: list[str], labels: np.ndarray, prefix: str) -> dict[int, str]:
    """``{label: class folder name}`` of a ``_labelled_tree`` (the folder below ``prefix``)."""
    depth = len(Path(prefix).parts)
    return {int(label): Path(path).parts[depth] for path, label in zip(relpaths, labels.tolist())}


def _finish(
    name: str, found: dict[str, Any], where: Path, verify_counts: bool, hint: str = ""
) -> dict[str, ImageCollection]:
    if verify_counts:
        verify_official_counts(name, found, where, hint)
    _check_nonempty(name, found, where)
    return found


def _image_files(folder: Path, recursive: bool) -> list[str]:
    """Image files under ``folder``, relative to it and sorted; hidden files (``.x``, ``._x``) are skipped."""
    found = []
    for current, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")] if recursive else []
        prefix = Path(current).relative_to(folder)
        for file in files:
            if not file.startswith(".") and Path(file).suffix.lower() in IMAGE_EXTENSIONS:
                found.append((prefix / file).as_posix())
    return sorted(found)


def _class_folders(root: Path) -> list[str]:
    """Sorted class folder names; a linked folder that leads back into (or above) ``root`` is refused."""
    names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    real_root = os.path.realpath(root)
    for name in names:
        if not os.path.islink(root / name):
            continue
        target = os.path.realpath(root / name)
        if target == real_root or real_root.startswith(target + os.sep) or target.startswith(real_root + os.sep):
            raise DataError(
                f"class folder {str(root / name)!r} is a symbolic link to {target!r}, inside or above the data "
                "root: it would become an extra class holding copies of other images; remove the link"
            )
    return names


def _labelled_tree(base: Path, prefix: str, recursive: bool) -> tuple[list[str], np.ndarray]:
    """Relative paths and labels (sorted class-folder order; folders without images get no label)."""
    relpaths, labels = [], []
    for folder in _class_folders(base / prefix):
        files = _image_files(base / prefix / folder, recursive)
        if not files:
            logger.warning("class folder %s holds no images and is skipped", base / prefix / folder)
            continue
        relpaths += [(Path(prefix) / folder / file).as_posix() for file in files]
        labels += [labels[-1] + 1 if labels else 0] * len(files)
    return relpaths, np.asarray(labels, dtype=np.int64)


@DATASETS.register("cub")
def read_cub(root: str | Path | None, verify_counts: bool = True) -> DatasetSplits:
    """CUB-200-2011: ``CUB_200_2011/images/<NNN.Name>/*.jpg``; classes 001-100 train, 101-200 test."""
    base = _dataset_dir("cub", root, "CUB_200_2011", "images")
    relpaths, labels = _labelled_tree(base, "images", recursive=False)
    hint = " (6,033 images is CUB-200 2010, not CUB-200-2011)" if len(relpaths) == 6_033 else ""
    names = _folder_names(relpaths, labels, "images")
    found = _finish("cub", _split_by_class(base, relpaths, labels, 100, names), base, verify_counts, hint)
    return DatasetSplits("cub", found["train"], found["test"], recall_ks=(1, 2, 4, 8))


@DATASETS.register("cars")
def read_cars(root: str | Path | None, verify_counts: bool = True) -> DatasetSplits:
    """Cars-196: ``cars196/cars_annos.mat`` + ``car_ims/``; classes 1-98 train, 99-196 test (by class).

    The official per-image test flag of ``cars_annos.mat`` is ignored, as in the reference code.
    """
    base = _dataset_dir("cars", root, "cars196", "cars_annos.mat")
    relpaths, classes = load_cars_annotations(base / "cars_annos.mat")
    names = load_cars_class_names(base / "cars_annos.mat")
    found = _finish("cars", _split_by_class(base, relpaths, classes - 1, 98, names), base, verify_counts)
    for collection in found.values():
        _check_listed("cars", collection, "cars_annos.mat")  # type: ignore[arg-type]
    return DatasetSplits("cars", found["train"], found["test"], recall_ks=(1, 2, 4, 8))


@DATASETS.register("sop")
def read_sop(root: str | Path | None, verify_counts: bool = True) -> DatasetSplits:
    """Stanford Online Products: ``Ebay_train.txt`` for training, ``Ebay_test.txt`` for evaluation."""
    base = _dataset_dir("sop", root, "Stanford_Online_Products", "Ebay_train.txt")
    found = {}
    for split in ("train", "test"):
        relpaths, classes = read_sop_list(_require_file("sop", base / f"Ebay_{split}.txt"))
        labels = remap_labels(classes)
        # A product has no name in Ebay_*.txt: its super-class folder (bicycle_final -> bicycle) and class id.
        names = {
            int(label): f"{Path(path).parts[0].removesuffix('_final')} {raw}"
            for path, raw, label in zip(relpaths, classes, labels.tolist())
        }
        found[split] = FileImageCollection(base, relpaths, labels, names)
    _finish("sop", found, base, verify_counts)
    for split, collection in found.items():
        _check_listed("sop", collection, f"Ebay_{split}.txt")
    return DatasetSplits("sop", found["train"], found["test"], recall_ks=(1, 10, 100, 1000))


def _inshop_image_root(base: Path, first: str) -> tuple[Path, Callable[[str], str]]:
    """Where the ``img/...`` paths of the partition file live: ``Img/img/...``, ``img/...`` or ``Img/...``."""
    layouts: list[tuple[Path, Callable[[str], str]]] = [
        (base / "Img", lambda path: path),  # official code: Inshop_Clothes/Img/img/WOMEN/...
        (base, lambda path: path),  # img.zip unzipped in Inshop_Clothes: Inshop_Clothes/img/WOMEN/...
        (base, lambda path: "Img/" + path.split("/", 1)[-1]),  # renamed: Inshop_Clothes/Img/WOMEN/...
    ]
    for image_root, rewrite in layouts:
        if (image_root / rewrite(first)).is_file():
            return image_root, rewrite
    tried = ", ".join(repr(str(image_root / rewrite(first))) for image_root, rewrite in layouts)
    raise DataError(
        f"inshop: image {first!r} of list_eval_partition.txt not found (tried {tried}); "
        f"unzip Img/img.zip inside {str(base / 'Img')!r}"
    )


@DATASETS.register("inshop")
def read_inshop(root: str | Path | None, verify_counts: bool = True) -> DatasetSplits:
    """In-shop Clothes: train items remapped to 0..3996; query and gallery remapped jointly to 0..3984.

    ``test`` is query followed by gallery (for clustering metrics); ``query``/``gallery`` are views of it.
    """
    base = _dataset_dir("inshop", root, "Inshop_Clothes", "Eval/list_eval_partition.txt")
    rows = read_partition(_require_file("inshop", base / "Eval" / "list_eval_partition.txt"))
    image_root, rewrite = _inshop_image_root(base, rows[0][0])
    parts = {status: [(rewrite(path), item) for path, item, s in rows if s == status] for status in ("train", "query")}
    gallery_rows = [(rewrite(path), item) for path, item, s in rows if s == "gallery"]
    evaluation = parts["query"] + gallery_rows
    train = FileImageCollection(
        image_root, [p for p, _ in parts["train"]], remap_labels([i for _, i in parts["train"]])
    )
    test = FileImageCollection(image_root, [p for p, _ in evaluation], remap_labels([i for _, i in evaluation]))
    query = Subset(test, range(len(parts["query"])))
    gallery = Subset(test, range(len(parts["query"]), len(test)))
    found = {"train": train, "query": query, "gallery": gallery, "test": test}
    _finish("inshop", found, base, verify_counts)
    for collection in (train, test):
        _check_listed("inshop", collection, "list_eval_partition.txt")
    return DatasetSplits("inshop", train, test, query, gallery, recall_ks=(1, 10, 20, 30, 40, 50))


def _train_class_count(option: int | float, total: int) -> int:
    """Number of train classes from a fraction in (0, 1) (rounded half up) or a count."""
    if isinstance(option, float):
        if not 0.0 < option < 1.0:
            raise ConfigError(f"option train_classes={option!r} of dataset 'folder' must be a fraction in (0, 1)")
        return int(option * total + 0.5)
    return option


@DATASETS.register("folder")
def read_folder(root: str | Path | None, train_classes: int | float = 0.5) -> DatasetSplits:
    """A user's ``root/<class>/<image>`` tree: the first ``train_classes`` sorted classes train, others test.

    ``train_classes`` is a fraction of the classes (float, default half) or a count (int). Images may sit in
    subfolders of a class folder; hidden files and folders are ignored.
    """
    if root is None or not Path(root).expanduser().is_dir():
        raise DataError(f"folder dataset root {str(root)!r} is not a folder; expected root/<class>/<image files>")
    base = Path(root).expanduser()
    relpaths, labels = _labelled_tree(base, "", recursive=True)
    total = int(labels.max()) + 1 if len(labels) else 0
    first_test = _train_class_count(train_classes, total)
    if first_test < 2 or total - first_test < 2:
        raise DataError(
            f"folder dataset {str(base)!r}: {total} class folders with images split into {first_test} train "
            f"/ {total - first_test} test classes; each side needs at least 2 (adjust train_classes or add "
            "classes)"
        )
    found = _split_by_class(base, relpaths, labels, first_test, _folder_names(relpaths, labels, ""))
    return DatasetSplits("folder", found["train"], found["test"], recall_ks=(1, 2, 4, 8))


@DATASETS.register("csv")
def read_csv(root: str | Path | None) -> DatasetSplits:
    """Images listed in a CSV file (``root``) with columns path,label,split[,is_query,is_gallery].

    See ``read_csv_table`` for the format and its checks.

    Train labels are remapped on their own, test labels jointly over all test rows; when the CSV has
    ``is_query``/``is_gallery`` columns, ``query`` and ``gallery`` are views of ``test``.
    """
    if root is None:
        raise DataError("dataset 'csv' needs the path of a CSV file with columns path,label,split as its root")
    table = read_csv_table(Path(root).expanduser())
    folder = table.path.parent
    train_labels, test_labels = remap_labels(table.train_labels), remap_labels(table.test_labels)
    train = FileImageCollection(folder, table.train_paths, train_labels, _raw_names(table.train_labels, train_labels))
    test = FileImageCollection(folder, table.test_paths, test_labels, _raw_names(table.test_labels, test_labels))
    query = gallery = None
    if table.is_query is not None and table.is_gallery is not None:
        query = Subset(test, [i for i, flag in enumerate(table.is_query) if flag])
        gallery = Subset(test, [i for i, flag in enumerate(table.is_gallery) if flag])
    return DatasetSplits("csv", train, test, query, gallery, recall_ks=(1, 2, 4, 8))
