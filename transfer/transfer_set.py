"""Label-free transfer sets: distil on any folder of images instead of the dataset's labelled train split.

Relaxed contrastive, relaxed MS, RKD and PKT read only the teacher's outputs, never a label, so the student
can learn from images nobody labelled: unlabeled in-domain photos, a product catalogue, a crawl. With
``transfer_set`` (``--transfer-set FOLDER``) every image file under the folder (searched recursively, hidden
files skipped) is a training image; batches are drawn uniformly at random (``train.ipc`` must be null: there
are no classes to sample P x K from). The dataset named by ``data`` still supplies the labelled test split
that the student is evaluated on. Keep test images out of the transfer set, or the numbers are optimistic.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from dmlkd.data.base import DatasetSplits, FileImageCollection
from dmlkd.data.readers import IMAGE_EXTENSIONS, _image_files
from dmlkd.errors import ConfigError, DataError, choices
from dmlkd.registry import TRANSFER_METHODS


def label_free_methods() -> list[str]:
    """The registered methods that never read a label (the ones a transfer set can train)."""
    return sorted(name for name in TRANSFER_METHODS.names() if not TRANSFER_METHODS.get(name).uses_labels)


def check_transfer_set_options(method: str, ipc: int | None) -> None:
    """The method must be label-free and the sampler class-free; raises ``ConfigError`` otherwise."""
    if TRANSFER_METHODS.get(method).uses_labels:
        raise ConfigError(
            f"method {method!r} reads class labels, which a transfer set does not have; "
            f"with --transfer-set use one of: {choices(label_free_methods())}"
        )
    if ipc is not None:
        raise ConfigError(
            f"a transfer set has no classes to sample {ipc} images per class from; "
            "drop --ipc (or --set train.ipc=null): batches are drawn uniformly at random"
        )


def read_transfer_set(folder: str | Path) -> FileImageCollection:
    """Every image file under ``folder`` (recursively, sorted), all with label 0 (unused)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"transfer set {str(folder)!r} does not exist or is not a folder; pass a folder of images")
    files = _image_files(root, recursive=True)
    if not files:
        raise DataError(
            f"transfer set {str(folder)!r} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}, "
            "searched recursively)"
        )
    return FileImageCollection(root, files, np.zeros(len(files), dtype=np.int64))


def with_transfer_set(splits: DatasetSplits, folder: str | Path) -> DatasetSplits:
    """``splits`` with the train split replaced by the transfer set (the test side is unchanged)."""
    return dataclasses.replace(splits, train=read_transfer_set(folder))
