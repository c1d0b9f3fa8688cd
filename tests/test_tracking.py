"""Watching a run: plain log lines without a terminal, steps.jsonl, --report-to tensorboard, a missing tracker."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from dmlkd.cli import main
from dmlkd.config import TrainConfig
from dmlkd.engine.tracking import STEPS_FILE, Watcher, check_trackers, flat_hparams
from dmlkd.errors import ConfigError

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


def _run(args: list[str]):
    return CliRunner().invoke(main, args)


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return found


def test_teacher_run_logs_lines_steps_and_tensorboard(tmp_path: Path, tiny_glyph_args: list[str]) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    args = ["teacher", "train", "--out", str(out), "--max-steps", "4", "--epochs", "2", *tiny_glyph_args]
    result = _run([*args, "--set", "train.log_every=2", "--report-to", "tensorboard"])
    assert result.exit_code == 0, result.output
    # Not a terminal: timestamped plain lines on stdout, with the stage, every 2 steps and around the evaluation.
    lines = result.stdout.splitlines()
    steps = [line for line in lines if re.match(rf"{STAMP} teacher: step \d/4 epoch \d loss \d", line)]
    assert [re.search(r"step (\d)/", line).group(1) for line in steps] == ["2", "4"]
    assert all("lr " in line and "img/s" in line and "eta " in line for line in steps)
    assert any(re.match(rf"{STAMP} teacher: evaluating epoch \d \(step 4\)", line) for line in lines)
    assert any(re.match(rf"{STAMP} teacher: epoch \d \(step 4\) .*recall@1 \d\.\d{{4}}", line) for line in lines)

    rows = [json.loads(line) for line in (out / STEPS_FILE).read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    for row in rows:
        assert row["loss"] > 0 and row["images_per_s"] > 0 and row["lr"] and "proxy_anchor" in row
        assert all(value > 0 for value in row["lr"].values())

    scalars = _scalars(out / "trackers")
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [value for _, value in scalars["train/loss"]] == pytest.approx([row["loss"] for row in rows])
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert scalars["eval/recall@1"] == [(4, pytest.approx(metrics["recall@1"]))]
    assert any(tag.startswith("train/lr/") for tag in scalars) and "train/images_per_s" in scalars
    # The resolved config is logged as hyper-parameters (Accelerate's TensorBoard tracker keeps a copy as YAML).
    hparams = next((out / "trackers").rglob("hparams.yml")).read_text()
    assert "train.max_steps: 4" in hparams and "loss.name: proxy_anchor" in hparams


def test_missing_tracker_is_one_line_naming_the_extra(tmp_path: Path, tiny_glyph_args: list[str], monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    out = tmp_path / "run"
    result = _run(
        ["teacher", "train", "--out", str(out), "--max-steps", "1", *tiny_glyph_args, "--report-to", "tensorboard"]
    )
    assert result.exit_code == 2
    assert (
        result.stderr.count("\n") == 1
        and "error: --report-to tensorboard needs the tensorboard package" in result.stderr
    )
    assert "pip install 'dmlkd[tracking]'" in result.stderr and "pip install -e '.[tracking]'" in result.stderr
    assert not out.exists()
    result = _run(["transfer", "train", "--teacher", str(out), "--out", str(out), "--report-to", "tensorbord"])
    assert result.exit_code == 2 and "unknown tracker 'tensorbord'" in result.stderr and "wandb" in result.stderr


def test_check_trackers_and_config_field() -> None:
    pytest.importorskip("tensorboard")
    assert check_trackers(["tensorboard", "tensorboard"]) == ["tensorboard"]
    with pytest.raises(ConfigError, match="choose from: aim, clearml, comet_ml"):
        check_trackers(["neptune"])
    assert TrainConfig().report_to == [] and TrainConfig(report_to=["tensorboard"]).report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match="log-every must be >= 0"):
        TrainConfig(log_every=-1)
    assert flat_hparams({"a": {"b": 1, "c": [1, 2], "d": None}}) == {"a.b": 1, "a.c": "[1, 2]", "a.d": "null"}


def test_resumed_watcher_drops_rows_it_will_redo(tmp_path: Path) -> None:
    path = tmp_path / STEPS_FILE
    path.write_text("".join(json.dumps({"step": step, "loss": float(step)}) + "\n" for step in range(1, 6)))
    train = TrainConfig(progress=False)
    with Watcher(label="student", run_dir=tmp_path, train=train, total_steps=8, initial_step=3, main=True) as watcher:
        watcher.step(4, 0, {"loss": 0.5}, {"backbone": 1e-3}, 8, 0.1)
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
