"""Label-free transfer sets: a folder of unlabeled images replaces the labelled train split."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from dmlkd.cli import main
from dmlkd.config import DataConfig
from dmlkd.data.catalog import build_splits
from dmlkd.errors import ConfigError, DataError
from dmlkd.registry import TRANSFER_METHODS
from dmlkd.transfer.cache.teacher_cache import describe_cache
from dmlkd.transfer.transfer_set import check_transfer_set_options, label_free_methods, read_transfer_set


def _invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    stderr = result.stderr
    if result.exc_info is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return result.exit_code, result.stdout, stderr


def _write_glyph_set(folder: Path, max_classes: int) -> int:
    """The glyph train images of a ``max_classes`` subset as PNG files in three sub-folders, no labels."""
    splits, _ = build_splits(DataConfig(name="glyphs", options={"max_classes": max_classes}))
    for index in range(len(splits.train)):
        part = folder / f"part{index % 3}"
        part.mkdir(parents=True, exist_ok=True)
        splits.train.load(index).save(part / f"image{index:04d}.png")
    return len(splits.train)


def test_read_transfer_set_is_recursive_and_skips_hidden_and_other_files(tmp_path: Path) -> None:
    for relative in ("a.png", "sub/b.JPG", "sub/deeper/c.webp", ".hidden.png", ".cache/d.png", "notes.txt"):
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".txt":
            path.write_text("not an image")
        else:
            Image.new("RGB", (8, 8), (10, 20, 30)).save(path, format="PNG")
    collection = read_transfer_set(tmp_path)
    assert collection.identifiers == ["a.png", "sub/b.JPG", "sub/deeper/c.webp"]
    assert collection.labels.tolist() == [0, 0, 0]
    assert collection.load(2).size == (8, 8)


@pytest.mark.parametrize("make", ["missing", "empty", "file"])
def test_unusable_transfer_set_is_a_data_error(tmp_path: Path, make: str) -> None:
    target = tmp_path / "set"
    if make == "empty":
        target.mkdir()
        (target / "readme.txt").write_text("no images here")
    elif make == "file":
        target.write_text("a file")
    with pytest.raises(DataError, match="transfer set"):
        read_transfer_set(target)


def test_only_label_free_methods_and_random_batches() -> None:
    free = label_free_methods()
    assert {"relaxed_contrastive", "relaxed_ms", "rkd", "pkt"} <= set(free)
    assert all(not TRANSFER_METHODS.get(name).uses_labels for name in free)
    for name in set(TRANSFER_METHODS.names()) - set(free):
        with pytest.raises(ConfigError, match="reads class labels"):
            check_transfer_set_options(name, None)
    with pytest.raises(ConfigError, match="no classes to sample 2 images per class"):
        check_transfer_set_options("relaxed_contrastive", 2)


@pytest.fixture(scope="module")
def teacher_and_set(tmp_path_factory: pytest.TempPathFactory, demo_teacher_run: Path) -> tuple[Path, Path, int]:
    """The session's demo teacher (norm-softmax, 50 steps on a 40-class glyph subset; tests/conftest.py) and
    that subset's train images as an unlabeled folder."""
    root = tmp_path_factory.mktemp("transfer-set")
    images = _write_glyph_set(root / "unlabeled", 40)
    return demo_teacher_run, root / "unlabeled", images


def _transfer_args(teacher: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return [
        "transfer", "train", "--teacher", str(teacher), "--student", "resnet18-32", "--dataset", "glyphs",
        "--set", "data.options.max_classes=40", "--transfer-set", str(images), "--out", str(out),
        "--no-progress", "--set", "eval.nmi=false", "--set", f"teacher.cache_dir={out.parent / 'cache'}", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_student_learns_from_unlabeled_images(tmp_path: Path, teacher_and_set: tuple[Path, Path, int]) -> None:
    teacher, images, count = teacher_and_set
    out = tmp_path / "student"
    extra = ["--epochs", "5", "--set", "train.eval_at_start=true", "--set", "train.eval_every=5"]
    extra += ["--teacher-mode", "cached"]  # the cache covers the transfer set's images
    code, stdout, stderr = _invoke(*_transfer_args(teacher, images, out, *extra))
    assert code == 0, stderr
    assert "teacher mode: cached" in stdout
    record = json.loads((out / "last" / "config.json").read_text())
    assert record["provenance"]["transfer_set"] == str(images)
    assert record["provenance"]["train_images"] == count
    assert record["train_config"]["train"]["ipc"] is None
    (cache_file,) = (tmp_path / "cache").glob("teacher-*.safetensors")
    assert describe_cache(cache_file)["num_images"] == count  # the cache covers the transfer set's images
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert history[0]["epoch"] == 0 and history[-1]["epoch"] == 5
    # Measured: the untrained student 43 %, after 50 steps on the unlabeled images about 62 % (and 64 % on the
    # labelled split with P x K batches).
    assert history[-1]["recall@1"] > history[0]["recall@1"] + 0.08, history


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "darkrank"], "method 'darkrank' reads class labels"),
        (["--ipc", "4"], "no classes to sample 4 images per class from"),
    ],
)
def test_cli_refuses_what_a_transfer_set_cannot_do(
    tmp_path: Path, teacher_and_set: tuple[Path, Path, int], extra: list[str], message: str
) -> None:
    teacher, images, _ = teacher_and_set
    out = tmp_path / "student"
    code, _, stderr = _invoke(*_transfer_args(teacher, images, out, "--max-steps", "1", *extra))
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], stderr
    assert not out.exists()  # refused before the run folder was made


def test_cli_missing_transfer_set_is_one_line(tmp_path: Path, teacher_and_set: tuple[Path, Path, int]) -> None:
    teacher, _, _ = teacher_and_set
    code, _, stderr = _invoke(*_transfer_args(teacher, tmp_path / "nowhere", tmp_path / "student"))
    assert code == 2 and "does not exist or is not a folder" in stderr and str(tmp_path / "nowhere") in stderr
