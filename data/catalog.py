"""Builds dataset splits by name; importing this module registers every built-in reader."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from dmlkd.config.sections import DataConfig
from dmlkd.data import glyphs as _glyphs  # noqa: F401  (registers "glyphs")
from dmlkd.data import readers as _readers  # noqa: F401  (registers cub, cars, sop, inshop, folder, csv)
from dmlkd.data.base import DatasetSplits
from dmlkd.data.checks import check_duplicates, drop_bad_images
from dmlkd.registry import DATASETS


def build_splits(config: DataConfig) -> tuple[DatasetSplits, list[tuple[str, str]]]:
    """Read the dataset named in ``config``; returns the splits and the bad images it skipped (if asked)."""
    root = Path(config.root).expanduser() if config.root else None
    splits = DATASETS.build(config.name, root, **config.options)
    if not config.allow_duplicates:
        check_duplicates(splits, by_content=config.name in ("csv", "folder"))
    bad: list[tuple[str, str]] = []
    if config.skip_bad_images:
        splits, bad = drop_bad_images(splits)
    return splits, bad


def describe_datasets() -> list[dict[str, Any]]:
    """Name, one-line summary (the reader's docstring) and options of every registered dataset."""
    rows = []
    for name in DATASETS.names():
        builder = DATASETS.get(name)
        summary = (inspect.getdoc(builder) or "").split("\n")[0].replace("``", "")  # docstring RST -> plain
        rows.append({"name": name, "summary": summary, "options": list(DATASETS.options(name))})
    return rows
