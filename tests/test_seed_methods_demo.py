"""The seed systems' teacher methods on the demo data: a short run trains, and its folder is a pipeline's SRC.

Runs are on a 40-class glyph subset (20 training classes) with ResNet-18-32 from scratch; each must lift
Recall@1 at least 5 points above the untrained network's value (about 49 % here). The losses PaddlePaddle
uses only for fine-tuning (quadruplet, EML, N-pairs) follow its two-step recipe: an ArcMargin pretrain, then
the pair loss at lr 1e-4 from that checkpoint, both on unnormalised embeddings as PaddlePaddle trains them;
as in PaddlePaddle's table, the fine-tune must also improve on the pretrain.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest
from click.testing import CliRunner

import dmlkd
from dmlkd.cli import main
from tests.conftest import DEMO_DATA

pytestmark = pytest.mark.slow

DEMO = DEMO_DATA  # tests/conftest.py: ResNet-18-32, 40 glyph classes, no NMI
# Fine-tune epochs: N-pairs moves slowest at lr 1e-4; after 3 epochs its R@1 was within 2 of 640 test images of
# the pretrain's (either side, by float rounding: the fused optimiser flipped it), after 5 it is 18 above.
EPOCHS = {"quadruplet": 3, "eml": 3, "npairs": 5}
MARGIN = 0.05  # Recall@1 gain over the untrained network that a run must reach
RAW = ["--set", "model.l2_norm=false"]  # PaddlePaddle's losses normalise (or not) by themselves


def _run(*args: str) -> None:
    result = CliRunner().invoke(main, list(args))
    detail = result.stderr
    if result.exc_info is not None and not isinstance(result.exception, SystemExit):
        detail += "".join(traceback.format_exception(*result.exc_info))
    assert result.exit_code == 0, detail


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train(out: Path, *extra: str, epochs: int = 5, batch: int = 64, ipc: int = 4) -> list[dict]:
    _run(
        "teacher",
        "train",
        "--out",
        str(out),
        *DEMO,
        "--batch-size",
        str(batch),
        "--ipc",
        str(ipc),
        "--epochs",
        str(epochs),
        "--set",
        f"train.eval_every={epochs}",
        *extra,
    )
    return _history(out)


@pytest.fixture(scope="module")
def arcmargin_pretrain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """PaddlePaddle's first step, 50 steps; returns the run and the untrained network's Recall@1."""
    out = tmp_path_factory.mktemp("pd") / "pretrain"
    history = _train(out, "--loss", "arcmargin", *RAW)
    assert history[0]["epoch"] == 0  # the demo recipe evaluates the untrained network first
    assert history[-1]["recall@1"] > history[0]["recall@1"] + MARGIN, history
    return out, history[0]["recall@1"]


@pytest.mark.parametrize(
    "extra",
    [
        ["--loss", "multi_similarity"],
        ["--loss", "contrastive"],
        ["--loss", "margin"],
        ["--loss", "triplet"],
        ["--loss", "margin", "--nb-clusters", "2", "--mod-epoch", "2", "--force-full-embedding-epoch", "4"],
        ["--loss", "multi_similarity", "--intra", "--set", "iaa.start_epoch=2"],
    ],
    ids=["multi_similarity", "contrastive", "margin", "triplet", "divide_and_conquer", "iaa"],
)
def test_from_scratch_run_beats_the_untrained_network(tmp_path: Path, extra: list[str]) -> None:
    history = _train(tmp_path / "run", *extra)
    assert history[0]["epoch"] == 0 and history[-1]["epoch"] == 5
    assert history[-1]["recall@1"] > history[0]["recall@1"] + MARGIN, history


@pytest.mark.parametrize("loss", ["quadruplet", "eml", "npairs"])
def test_paddle_fine_tune_beats_the_untrained_network(
    tmp_path: Path, arcmargin_pretrain: tuple[Path, float], loss: str
) -> None:
    pretrain, untrained = arcmargin_pretrain
    pretrained = _history(pretrain)[-1]["recall@1"]
    shape = {"batch": 40, "ipc": 2} if loss == "npairs" else {}  # N-pairs: 20 classes x 2 images
    history = _train(
        tmp_path / "run", "--loss", loss, "--init", str(pretrain), "--lr", "1e-4", *RAW, epochs=EPOCHS[loss], **shape
    )
    assert history[-1]["recall@1"] > untrained + MARGIN, history
    assert history[-1]["recall@1"] > pretrained, (pretrained, history)


# ---------------------------------------------------------------------------------------------------------
# A teacher folder trained with any of them is the SRC of a pipeline


@pytest.mark.parametrize(
    "extra",
    [
        ["--loss", "npairs", "--ipc", "2"],
        ["--loss", "margin", "--ipc", "4", "--nb-clusters", "2", "--mod-epoch", "1"],
        ["--loss", "contrastive", "--ipc", "4", "--intra"],
    ],
    ids=["npairs", "divide_and_conquer", "iaa"],
)
def test_teacher_folder_serves_as_pipeline_source(tmp_path: Path, tiny_glyph_args: list[str], extra: list[str]) -> None:
    teacher = tmp_path / "teacher"
    _run("teacher", "train", "--out", str(teacher), "--max-steps", "2", *tiny_glyph_args, *extra)  # extra's --ipc wins
    out = tmp_path / "pipeline"
    _run(
        "pipeline",
        "dim-reduction",
        "--src",
        str(teacher),
        "--dst",
        "resnet18-8",
        "--out",
        str(out),
        "--set",
        "data.options.max_classes=16",
        "--max-steps",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--set",
        "transfer.train.ipc=2",
        "--set",
        "transfer.eval.nmi=false",
        "--set",
        "transfer.teacher.cache_views=2",
        "--set",
        f"transfer.teacher.cache_dir={json.dumps(str(tmp_path / 'cache'))}",
        "--no-progress",
    )
    steps = json.loads((out / "pipeline.json").read_text())["steps"]
    assert "teacher_check" in steps and "teacher" not in steps  # SRC was a folder: checked, not trained
    assert (out / "results.json").exists() and (out / "report.md").exists()
    student = dmlkd.load(str(out / "students" / "relaxed_contrastive"))
    assert student.embedding_dim == 8
