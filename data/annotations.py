"""Annotation-file parsers of the dataset readers: SOP lists, the In-shop partition, ``cars_annos.mat``, CSV.

Each parser reads one file and checks its layout; every problem is a one-line ``DataError`` naming the file
(and the line, for text files). ``remap_labels`` turns raw class ids into ``0..C-1``. ``dmlkd.data.readers``
turns the parsed rows into ``DatasetSplits``.
"""

from __future__ import annotations

import codecs
import csv
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dmlkd.errors import DataError

_TRUE, _FALSE = frozenset({"1", "true", "yes"}), frozenset({"0", "false", "no"})


def remap_labels(raw: Iterable[Any]) -> np.ndarray:
    """Labels ``0..C-1`` in sorted order of the raw labels (numeric order when all are integers)."""
    values = [int(v) if isinstance(v, (int, np.integer)) else str(v) for v in raw]
    unique = set(values)
    numeric = all(_as_int(v) is not None for v in unique)
    order = sorted(unique, key=(lambda v: (int(v), str(v))) if numeric else str)
    mapping = {value: index for index, value in enumerate(order)}
    return np.asarray([mapping[value] for value in values], dtype=np.int64)


def _as_int(value: int | str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None


def _read_lines(name: str, path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{name}: cannot read {str(path)!r}: {error}") from None


def read_sop_list(path: Path) -> tuple[list[str], list[int]]:
    """Paths and class ids of ``Ebay_*.txt`` (a header, then ``image_id class_id super_class_id path``)."""
    relpaths, classes = [], []
    for number, line in enumerate(_read_lines("sop", path)[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 4 or not fields[1].isdigit():
            raise DataError(
                f"sop: {str(path)!r} line {number}: expected 'image_id class_id super_class_id path', "
                f"got {line.strip()!r}"
            )
        relpaths.append(fields[3])
        classes.append(int(fields[1]))
    return relpaths, classes


def read_partition(path: Path) -> list[tuple[str, int, str]]:
    """Rows ``(image_name, item number, status)`` of In-shop's ``list_eval_partition.txt``.

    Line 1 is the image count, line 2 a header; the item number is the integer suffix of ``id_XXXXXXXX``.
    """
    lines, rows = _read_lines("inshop", path), []
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        item = fields[1].rsplit("_", 1)[-1] if len(fields) == 3 else ""
        if not item.isdigit() or fields[2] not in ("train", "query", "gallery"):
            raise DataError(
                f"inshop: {str(path)!r} line {number}: expected 'image_name id_NNNNNNNN "
                f"train|query|gallery', got {line.strip()!r}"
            )
        rows.append((fields[0], int(item), fields[2]))
    declared = lines[0].strip() if lines else ""
    if not rows:
        raise DataError(f"inshop: {str(path)!r} lists no images after its two header lines")
    if declared.isdigit() and int(declared) != len(rows):
        raise DataError(
            f"inshop: {str(path)!r} declares {int(declared):,} images on line 1 but lists {len(rows):,}; "
            "the file is incomplete or edited"
        )
    return rows


def load_cars_annotations(path: Path) -> tuple[list[str], np.ndarray]:
    """Relative paths and 1-based classes from ``cars_annos.mat`` (fields 0 and 5 of each record)."""
    import scipy.io

    try:
        annotations = scipy.io.loadmat(str(path))["annotations"]
    except Exception as error:  # scipy raises many error types on a damaged or foreign file
        raise DataError(f"cars: cannot read annotations from {str(path)!r}: {error!r}") from None
    names = set(annotations.dtype.names or ())
    path_field, class_field = ("relative_im_path", "class") if {"relative_im_path", "class"} <= names else (0, 5)
    relpaths, classes = [], []
    for k, record in enumerate(annotations.reshape(-1)):
        try:
            relpaths.append(str(np.asarray(record[path_field]).reshape(-1)[0]))
            classes.append(int(np.asarray(record[class_field]).reshape(-1)[0]))
        except (IndexError, ValueError, TypeError):
            raise DataError(f"cars: annotation {k} in {str(path)!r} has no image path or class") from None
    return relpaths, np.asarray(classes, dtype=np.int64)


def load_cars_class_names(path: Path) -> dict[int, str]:
    """``{class - 1: name}`` from the ``class_names`` of ``cars_annos.mat`` (empty when the file has none)."""
    import scipy.io

    try:
        names = scipy.io.loadmat(str(path), variable_names=["class_names"]).get("class_names")
    except Exception:  # the annotations themselves were read already; names are only for display
        return {}
    if names is None:
        return {}
    found = {}
    for index, cell in enumerate(np.asarray(names, dtype=object).reshape(-1)):
        try:
            found[index] = str(np.asarray(cell).reshape(-1)[0])
        except (IndexError, ValueError, TypeError):
            continue
    return found


@dataclass
class CsvTable:
    """The rows of a dataset CSV; flags are per test row and ``None`` without ``is_query``/``is_gallery``."""

    path: Path
    train_paths: list[str] = field(default_factory=list)
    train_labels: list[str] = field(default_factory=list)
    test_paths: list[str] = field(default_factory=list)
    test_labels: list[str] = field(default_factory=list)
    is_query: list[bool] | None = None
    is_gallery: list[bool] | None = None


def _flag(value: str, where: str, column: str) -> bool:
    lowered = value.strip().lower()
    if lowered not in _TRUE | _FALSE:
        raise DataError(f"{where}: {column}={value!r} is not a boolean; use one of 0, 1, true, false, yes, no")
    return lowered in _TRUE


def _csv_header(path: Path, reader: Any) -> dict[str, int]:
    header = [cell.strip().lower() for cell in next(reader, [])]
    required = ["path", "label", "split"]
    if "is_query" in header or "is_gallery" in header:
        required += ["is_query", "is_gallery"]
    missing = [column for column in required if column not in header]
    if missing:
        other = next((sep for sep in ";\t|" if len(header) == 1 and sep in header[0]), None)
        hint = f" separated by commas, not {other!r}" if other else ""
        raise DataError(
            f"CSV {str(path)!r}: missing column(s) {', '.join(missing)} in header {','.join(header)!r}; "
            f"expected path,label,split[,is_query,is_gallery]{hint}"
        )
    return {column: header.index(column) for column in required}


def _add_csv_row(table: CsvTable, values: dict[str, str], where: str) -> None:
    split = values["split"].lower()
    if split not in ("train", "test"):
        raise DataError(f"{where}: unknown split {values['split']!r}; valid: test, train")
    if not values["path"] or not values["label"]:
        raise DataError(f"{where}: empty path or label")
    if split == "train":
        table.train_paths.append(values["path"])
        table.train_labels.append(values["label"])
        return
    table.test_paths.append(values["path"])
    table.test_labels.append(values["label"])
    if table.is_query is not None and table.is_gallery is not None:
        table.is_query.append(_flag(values["is_query"], where, "is_query"))
        table.is_gallery.append(_flag(values["is_gallery"], where, "is_gallery"))
        if table.is_query[-1] and table.is_gallery[-1]:
            raise DataError(f"{where}: a test image is either a query or a gallery item, not both")


_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def _csv_text(path: Path) -> str:
    """The CSV's text: UTF-8, or UTF-8/16/32 announced by a byte-order mark (as spreadsheets save it)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read CSV {str(path)!r}: {error.strerror}") from None
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(
            f"CSV {str(path)!r} line {line}: byte {data[error.start]:#04x} is not {encoding.upper()} text; save the "
            "file as UTF-8 (with or without a byte-order mark) or UTF-16 with one"
        ) from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise DataError(
            f"CSV {str(path)!r} line {line}: holds a NUL character (a binary file, or UTF-16 without a byte-order "
            "mark?); save it as UTF-8 text"
        )
    return text


def read_csv_table(path: Path) -> CsvTable:
    """Parse and check a CSV with header ``path,label,split[,is_query,is_gallery]`` (extra columns ignored).

    Paths are relative to the CSV's folder or absolute and must exist; ``split`` is ``train`` or ``test``;
    the flags (0/1/true/false/yes/no) are read on test rows only. Every problem is a one-line ``DataError``.
    """
    if not path.is_file():
        raise DataError(f"CSV file {str(path)!r} does not exist; expected columns path,label,split")
    text = _csv_text(path)
    reader = csv.reader(text.splitlines())
    try:
        columns = _csv_header(path, reader)
        flagged = "is_query" in columns
        table = CsvTable(path, is_query=[] if flagged else None, is_gallery=[] if flagged else None)
        missing: list[tuple[int, str]] = []
        for row in reader:
            where = f"CSV {str(path)!r} line {reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(columns.values()):
                raise DataError(f"{where}: {len(row)} values, expected one per header column")
            values = {column: row[index].strip() for column, index in columns.items()}
            _add_csv_row(table, values, where)
            if not (path.parent / values["path"]).is_file():
                missing.append((reader.line_num, values["path"]))
    except csv.Error as error:
        raise DataError(f"CSV {str(path)!r} line {reader.line_num}: {error}") from None
    _check_csv_table(table, missing)
    return table


def _check_csv_table(table: CsvTable, missing: list[tuple[int, str]]) -> None:
    name = f"CSV {str(table.path)!r}"
    if missing:
        line, first = missing[0]
        raise DataError(
            f"{name}: {len(missing):,} image path(s) do not exist, first {first!r} on line {line} "
            f"(paths are relative to {str(table.path.parent)!r} or absolute)"
        )
    for split, paths in (("train", table.train_paths), ("test", table.test_paths)):
        if not paths:
            raise DataError(f"{name}: no rows with split={split}; both train and test rows are needed")
    for column, flags in (("is_query", table.is_query), ("is_gallery", table.is_gallery)):
        if flags is not None and not any(flags):
            raise DataError(f"{name}: no test row has {column} set; a query/gallery protocol needs both")
