"""A run folder stands for its last/ checkpoint in every command, and every output says which one and why.

The run folder here has different weights in last/ and best/, so which one a command used is visible in
what it computed, not only in what it printed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import dmlkd
from dmlkd.checkpoints import read_checkpoint_config, save_checkpoint
from dmlkd.cli import main
from dmlkd.models import create_model

LAST, BEST = "last/ (final step)", "best/ (selected on the test split)"
GLYPHS = ["--dataset", "glyphs", "--set", "data.options.max_classes=8", "--set", "eval.nmi=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("run-default") / "run"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"stage": "teacher", "status": "finished"}))
    for seed, name, epoch in ((0, "last", 3), (1, "best", 2)):
        torch.manual_seed(seed)
        metrics = {"recall@1": 0.1 * epoch, "epoch": epoch, "step": 10 * epoch, "selected": name}
        save_checkpoint(folder / name, create_model("resnet18-8"), metrics=metrics)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("default-images")
    for index, (cls, color) in enumerate((("a", (200, 0, 0)), ("a", (190, 10, 0)), ("b", (0, 0, 200)))):
        (folder / cls).mkdir(exist_ok=True)
        Image.new("RGB", (40, 40), color).save(folder / cls / f"{index}.png")
    return folder


def _digest(folder: Path) -> str:
    return read_checkpoint_config(folder)["files"]["model.safetensors"]


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def test_the_fixture_has_different_last_and_best(run: Path) -> None:
    assert _digest(run / "last") != _digest(run / "best")


def test_load_resolves_a_run_folder_to_last(run: Path) -> None:
    loaded = dmlkd.load(str(run)).state_dict()
    for name, expected in (("last", True), ("best", False)):
        other = dmlkd.load(str(run / name)).state_dict()
        assert all(torch.equal(loaded[k], other[k]) for k in loaded) is expected, name


@pytest.mark.parametrize("suffix, which, note", [("", "last", LAST), ("best", "best", BEST)])
def test_eval(run: Path, suffix: str, which: str, note: str) -> None:
    ref = str(run / suffix) if suffix else str(run)
    results = json.loads(_invoke("eval", ref, *GLYPHS, "--device", "cpu", "--json"))
    assert Path(results["checkpoint"]) == run / which
    assert (results["selected"], results["checkpoint_note"]) == (which, note)
    text = _invoke("eval", ref, *GLYPHS, "--device", "cpu")
    assert f"checkpoint {run / which} ({note}; saved at epoch" in text


@pytest.mark.parametrize("suffix, which, note", [("", "last", LAST), ("best", "best", BEST)])
def test_embed(run: Path, images: Path, tmp_path: Path, suffix: str, which: str, note: str) -> None:
    from dmlkd.inference.embed import read_embeddings

    out = tmp_path / "e.safetensors"
    ref = str(run / suffix) if suffix else str(run)
    line = _invoke("embed", ref, str(images), "--out", str(out), "--device", "cpu")
    assert f"model {(run / which).resolve()} ({note})" in line
    _, _, meta = read_embeddings(out)
    assert (meta["checkpoint"], meta["checkpoint_note"]) == (str((run / which).resolve()), note)
    assert meta["model_digest"] == _digest(run / which)


@pytest.mark.parametrize("suffix, which, note", [("", "last", LAST), ("best", "best", BEST)])
def test_export(run: Path, tmp_path: Path, suffix: str, which: str, note: str) -> None:
    ref = str(run / suffix) if suffix else str(run)
    line = _invoke("export", ref, "--format", "safetensors", "--out", str(tmp_path / "x"))
    assert f"from {(run / which).resolve()} ({note})" in line
    source = json.loads((tmp_path / "x" / "export.json").read_text())["source"]
    assert (source["checkpoint"], source["checkpoint_note"]) == (str((run / which).resolve()), note)
    assert source["model_digest"] == _digest(run / which)


@pytest.mark.parametrize("suffix, which, note", [("", "last", LAST), ("best", "best", BEST)])
def test_search(run: Path, images: Path, suffix: str, which: str, note: str) -> None:
    ref = str(run / suffix) if suffix else str(run)
    query = str(images / "a" / "0.png")
    args = ("search", query, "--gallery", str(images), "--model", ref, "-k", "2", "--device", "cpu")
    model = json.loads(_invoke(*args, "--json"))["model"]
    assert (model["checkpoint"], model["checkpoint_note"]) == (str((run / which).resolve()), note)
    assert model["model_digest"] == _digest(run / which)
    assert f"{(run / which).resolve()}: {note}" in _invoke(*args).splitlines()[0]


def test_search_with_a_gallery_file_uses_the_checkpoint_that_embedded_it(run: Path, images: Path, tmp_path: Path):
    gallery = tmp_path / "g.safetensors"
    _invoke("embed", str(run / "best"), str(images), "--out", str(gallery), "--device", "cpu")
    model = json.loads(_invoke("search", str(images / "b"), "--gallery", str(gallery), "-k", "2", "--json"))["model"]
    assert (model["checkpoint"], model["checkpoint_note"]) == (str((run / "best").resolve()), BEST)


@pytest.mark.parametrize("which, note", [(None, LAST), ("best", BEST)])
def test_hub_push_dry_run(run: Path, tmp_path: Path, which: str | None, note: str) -> None:
    preview = tmp_path / "preview"
    extra = ["--which", which] if which else []
    out = _invoke("hub", "push", str(run), "my-org/tiny", "--dry-run", "--out", str(preview), *extra)
    chosen = run / (which or "last")
    assert f"of {chosen} ({note}) to {preview}" in out
    assert _digest(preview) == _digest(chosen)


def test_a_run_folder_without_last_names_best_explicitly(run: Path, tmp_path: Path) -> None:
    import shutil

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copytree(run / "best", unfinished / "best")
    result = CliRunner().invoke(main, ["eval", str(unfinished), *GLYPHS, "--device", "cpu"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "has no last/ checkpoint" in result.stderr and repr(str(unfinished / "best")) in result.stderr
