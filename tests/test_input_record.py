"""A model remembers the input it was trained and evaluated at: ``dmlkd embed``, ``model.embed``, ``dmlkd export``
and ``dmlkd eval`` use it by default and reproduce the training run's own Recall@1 on the demo test images."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import dmlkd
from dmlkd.cli import main
from dmlkd.data.glyphs import build_glyphs
from dmlkd.evaluation.metrics import evaluate_embeddings
from dmlkd.inference.embed import read_embeddings
from dmlkd.models.inputs import recorded_image_size


def _cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.stderr + repr(result.exception)
    return result.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_teacher_run: Path) -> tuple[Path, Path, torch.Tensor, float]:
    """A 2-step demo teacher on 16 glyph classes (32 px; the session's shared run, read only), its test images
    as PNG files and labels, its R@1."""
    work = tmp_path_factory.mktemp("input-record")
    run = tiny_teacher_run
    test = build_glyphs(max_classes=16).test
    folder = work / "test-images"
    folder.mkdir()
    for index in range(len(test)):
        test.load(index).save(folder / f"{index:04d}.png")
    record = json.loads((run / "last" / "config.json").read_text())
    return run, folder, torch.as_tensor(test.labels), float(record["metrics"]["recall@1"])


def _recall(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    return evaluate_embeddings(embeddings, labels, ks=(1,), metric="cosine", compute_nmi=False)["recall@1"]


def test_every_path_embeds_at_the_recorded_size_and_matches_the_training_evaluation(trained, tmp_path):
    run, folder, labels, trained_r1 = trained
    record = json.loads((run / "last" / "config.json").read_text())
    assert record["provenance"]["input"]["image_size"] == 32 == recorded_image_size(record)
    assert record["provenance"]["input"]["resize_ratio"] == 1.0  # the glyph eval view does not zoom in
    paths = sorted(folder.glob("*.png"))

    out = tmp_path / "cli.safetensors"
    _cli("embed", str(run / "last"), str(folder), "--out", str(out))
    embeddings, names, metadata = read_embeddings(out)
    assert [Path(name).name for name in names] == [path.name for path in paths]
    assert metadata["image_size"] == 32
    assert _recall(embeddings, labels) == pytest.approx(trained_r1, abs=1e-9)

    model = dmlkd.load(str(run / "last"))
    assert _recall(model.embed(paths), labels) == pytest.approx(trained_r1, abs=1e-9)

    export = tmp_path / "export"
    _cli("export", str(run / "last"), "--format", "safetensors", "--out", str(export))
    exported = json.loads((export / "export.json").read_text())
    assert exported["input"]["shape"][2:] == [32, 32] and exported["input"]["eval_view"]["resize_ratio"] == 1.0
    assert _recall(dmlkd.load(str(export)).embed(paths), labels) == pytest.approx(trained_r1, abs=1e-9)

    results = json.loads(
        _cli(
            *("eval", "--checkpoint", str(run / "last"), "--dataset", "glyphs", "--set", "data.options.max_classes=16"),
            *("--set", "eval.nmi=false", "--json"),
        )
    )
    assert results["recall@1"] == pytest.approx(trained_r1, abs=1e-9)


def test_another_size_is_used_when_asked_with_a_warning(trained, caplog):
    run, folder, _labels, _ = trained
    model = dmlkd.load(str(run / "last"))
    paths = sorted(folder.glob("*.png"))[:3]
    with caplog.at_level(logging.WARNING, logger="dmlkd.models.inputs"):
        embeddings = model.embed(paths, image_size=48)
    assert "48 px" in caplog.text and "32 px" in caplog.text
    assert not torch.allclose(embeddings, model.embed(paths))
