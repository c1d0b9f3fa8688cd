"""The CLI as a user meets it: listing commands, eval, and one-line errors (CliRunner and real processes)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dmlkd.checkpoints.folder import save_checkpoint
from dmlkd.cli import main
from dmlkd.models import create_model


def _invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_version() -> None:
    import dmlkd

    code, out, _ = _invoke("--version")
    assert code == 0 and dmlkd.__version__ in out


def test_models_lists_architectures_and_taps() -> None:
    code, out, _ = _invoke("models", "--json")
    assert code == 0
    rows = {row["arch"]: row for row in json.loads(out)}
    assert set(rows) == {"bn_inception", "googlenet", "resnet18", "resnet34", "resnet50", "resnet101"}
    assert rows["resnet50"]["tap_channels"] == [256, 512, 1024, 2048]
    assert rows["bn_inception"]["tap_channels"] == [576, 1056, 1024]
    assert rows["bn_inception"]["input"].startswith("BGR 0-255")
    code, out, _ = _invoke("models")
    assert code == 0 and "resnet18" in out and "ARCH-DIM" in out


def test_datasets_lists_readers() -> None:
    code, out, _ = _invoke("datasets", "--json")
    assert code == 0
    names = {row["name"] for row in json.loads(out)}
    assert names == {"cars", "csv", "cub", "folder", "glyphs", "inshop", "sop"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    save_checkpoint(folder, create_model("resnet18-8"))
    return folder


GLYPHS = ["--dataset", "glyphs", "--set", "data.options.max_classes=8"]


def test_eval_json_and_table(checkpoint: Path) -> None:
    code, out, err = _invoke("eval", "--checkpoint", str(checkpoint), *GLYPHS, "--json")
    assert code == 0, err
    results = json.loads(out)
    metrics = {"recall@1", "recall@2", "recall@4", "recall@8", "map@r", "nmi"}
    assert set(results) == metrics | {"checkpoint", "selected", "checkpoint_note", "epoch", "step", "metric", "dataset"}
    assert all(0.0 <= results[key] <= 1.0 for key in metrics)
    assert results["checkpoint"] == str(checkpoint) and results["metric"] == "cosine" and results["selected"] is None
    code, out, err = _invoke(
        "eval",
        "--checkpoint",
        str(checkpoint),
        *GLYPHS,
        "--metric",
        "euclidean",
        "--set",
        "eval.ks=[1,3]",
        "--set",
        "eval.nmi=false",
    )
    assert code == 0, err
    assert out.split("\n")[0].split() == ["R@1", "R@3", "MAP@R"]
    assert out.splitlines()[2] == f"checkpoint {checkpoint}; euclidean distance on glyphs"


def test_eval_of_a_run_folder_names_the_checkpoint_it_used(checkpoint: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    model = create_model("resnet18-8")
    for name, epoch in (("best", 2), ("last", 3)):
        save_checkpoint(
            run / name, model, metrics={"recall@1": 0.5, "epoch": epoch, "step": 10 * epoch, "selected": name}
        )
    code, out, err = _invoke("eval", str(run), *GLYPHS, "--set", "eval.nmi=false", "--json")
    assert code == 0, err
    results = json.loads(out)
    assert results["checkpoint"] == str(run / "last") and results["selected"] == "last" and results["epoch"] == 3
    assert results["checkpoint_note"] == "last/ (final step)"
    code, out, err = _invoke("eval", str(run / "best"), *GLYPHS, "--set", "eval.nmi=false")
    assert code == 0, err
    assert f"checkpoint {run / 'best'} (best/ (selected on the test split); saved at epoch 2, step 20)" in out
    code, _, err = _invoke("eval", *GLYPHS)
    assert code == 2 and "Missing argument 'REF'" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--checkpoint", "{nowhere}"], "does not exist"),
        (
            ["--checkpoint", "{ckpt}", "--dataset", "imagenet"],
            "unknown dataset 'imagenet'; choose from: cars, csv",
        ),
        (["--checkpoint", "{ckpt}", "--dataset", "cub", "--data-root", "{nowhere}"], "nowhere"),
        (
            ["--checkpoint", "{ckpt}", "--set", "eval.metric=l1"],
            "'l1' is not valid; choose from: cosine, euclidean",
        ),
        (
            ["--checkpoint", "{ckpt}", "--set", "data.options.colour=1"],
            "unknown option 'colour' for dataset 'glyphs'; valid options: ",
        ),
        (["--checkpoint", "{ckpt}", "--device", "cuda:7"], "cuda"),
        (["--checkpoint", "{empty}"], "holds no checkpoint"),
    ],
)
def test_eval_errors_are_one_line(checkpoint: Path, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    values = {"nowhere": str(tmp_path / "nowhere"), "ckpt": str(checkpoint), "empty": str(tmp_path / "empty")}
    args = [arg.format(**values) for arg in args]
    code, _, err = _invoke("eval", *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_real_subprocess_error_has_no_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dmlkd", "eval", "--checkpoint", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: ")
    debug = subprocess.run(
        [sys.executable, "-m", "dmlkd", "--debug", "eval", "--checkpoint", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_last_checkpoint(
    tmp_path: Path, tiny_glyph_args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import dmlkd.checkpoints.folder as checkpoint_folder

    out = tmp_path / "run"
    real_save_file = checkpoint_folder.save_file
    kept: dict[str, bytes] = {}

    def save_file_until_full(tensors: object, filename: str, **kwargs: object) -> None:
        last = out / "last" / "model.safetensors"
        if not last.exists():  # the first checkpoint is written normally
            return real_save_file(tensors, filename, **kwargs)
        kept["last"] = last.read_bytes()
        Path(filename).write_bytes(b"partial")  # the next write runs out of space half-way
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(checkpoint_folder, "save_file", save_file_until_full)
    args = ["teacher", "train", "--out", str(out), "--epochs", "2", "--max-steps", "4", *tiny_glyph_args]
    result = CliRunner().invoke(main, [*args, "--set", "train.eval_every=1"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: no space left on device: ") and "free some space" in lines[0]
    assert not list(out.glob(".*tmp-*"))  # the half-written folder is gone
    assert (out / "last" / "model.safetensors").read_bytes() == kept["last"]
