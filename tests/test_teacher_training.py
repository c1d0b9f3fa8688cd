"""The shared training loop on the teacher stage: freezing rules, schedule, groups, runs, resume, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dmlkd.cli import main
from dmlkd.config import OptimConfig, from_dict
from dmlkd.engine.optim import batchnorm_modules, build_optimizer, build_scheduler, configure_epoch
from dmlkd.models import create_model
from dmlkd.teacher.config import TeacherConfig, start_tree
from dmlkd.teacher.losses.proxy_anchor import ProxyAnchorLoss
from dmlkd.teacher.module import TeacherModule
from dmlkd.teacher.trainer import param_groups
from tests import prestarted


def _flags(model: torch.nn.Module) -> tuple[set[bool], set[bool], set[bool]]:
    bn_params = {id(p) for bn in batchnorm_modules(model) for p in bn.parameters()}
    head = {p.requires_grad for p in model.embedding.parameters()}
    bn = {p.requires_grad for p in model.parameters() if id(p) in bn_params}
    other = {p.requires_grad for p in model.backbone.parameters() if id(p) not in bn_params}
    return head, bn, other


def test_warmup_trains_only_the_head() -> None:
    model = create_model("resnet18-8").train()
    configure_epoch(model, model.embedding, OptimConfig(warmup_epochs=2, bn_freeze=False), epoch=1)
    assert _flags(model) == ({True}, {False}, {False})
    assert all(bn.training for bn in batchnorm_modules(model))  # running stats still update (reference)


def test_reference_warmup_reenables_frozen_bn_affine() -> None:
    model = create_model("resnet18-8").train()
    config = OptimConfig(warmup_epochs=1, bn_freeze=True, warmup_unfreezes_bn=True)
    configure_epoch(model, model.embedding, config, epoch=0)
    assert _flags(model) == ({True}, {False}, {False})
    model.train()
    configure_epoch(model, model.embedding, config, epoch=1)
    assert _flags(model) == ({True}, {True}, {True})  # seed-spec §4: BN gamma/beta train after warm-up
    assert not any(bn.training for bn in batchnorm_modules(model))  # running stats stay frozen


def test_corrected_warmup_keeps_bn_frozen() -> None:
    model = create_model("resnet18-8").train()
    config = OptimConfig(warmup_epochs=1, bn_freeze=True, warmup_unfreezes_bn=False)
    configure_epoch(model, model.embedding, config, epoch=3)
    assert _flags(model) == ({True}, {False}, {True})


def test_bn_freeze_without_warmup() -> None:
    model = create_model("resnet18-8").train()
    configure_epoch(model, model.embedding, OptimConfig(bn_freeze=True), epoch=0)
    assert _flags(model) == ({True}, {False}, {True})
    assert not any(bn.training for bn in batchnorm_modules(model))


def test_step_lr_schedule_and_group_multipliers() -> None:
    model = create_model("resnet18-8")
    module = TeacherModule(model, ProxyAnchorLoss(5, 8), "proxy_anchor")
    tree = start_tree("pa-cub-resnet50", None, None)
    tree["model"].update(arch="resnet18", embedding_dim=8, pretrained=False)
    config = from_dict(TeacherConfig, tree)
    optimizer = build_optimizer(param_groups(module, config), config.optim)
    scheduler = build_scheduler(optimizer, config.optim, epochs=12)
    seen = []
    for _epoch in range(12):
        seen.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    # pa-cub-resnet50: lr 1e-4, step 5, gamma 0.5; proxies at 100x.
    assert seen[0] == pytest.approx({"backbone": 1e-4, "head": 1e-4, "loss": 1e-2})
    assert seen[4]["backbone"] == pytest.approx(1e-4) and seen[5]["backbone"] == pytest.approx(5e-5)
    assert seen[10]["loss"] == pytest.approx(1e-2 * 0.25)
    proxies = {id(p) for g in optimizer.param_groups if g["name"] == "loss" for p in g["params"]}
    assert proxies == {id(module.criterion.proxies)}


def _run(args: list[str]) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of the CLI run in-process."""
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.stdout, result.stderr


def test_short_run_writes_checkpoints(tmp_path: Path, tiny_glyph_args: list[str]) -> None:
    out = tmp_path / "run"
    code, output, stderr = _run(
        ["teacher", "train", "--out", str(out), "--max-steps", "3", "--epochs", "2", *tiny_glyph_args]
    )
    assert code == 0, stderr
    assert "R@1" in output
    for name in ("last", "best"):
        record = json.loads((out / name / "config.json").read_text())
        assert record["metrics"]["step"] == 3
        assert record["train_config"]["loss"]["name"] == "proxy_anchor"
        proxies = load_file(str(out / name / "loss.safetensors"))["proxies"]
        assert proxies.shape == (8, 16)  # 8 training classes of the 16-class subset
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["step"] == 3
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["train"]["max_steps"] == 3 and saved["model"]["embedding_dim"] == 16
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    # The run folder is itself a checkpoint for `dmlkd eval`.
    code, output, stderr = _run(
        [
            "eval",
            "--checkpoint",
            str(out),
            "--dataset",
            "glyphs",
            "--set",
            "data.options.max_classes=16",
            "--json",
        ]
    )
    assert code == 0, stderr
    assert 0.0 <= json.loads(output)["recall@1"] <= 1.0


def test_existing_run_is_not_overwritten(tmp_path: Path, tiny_glyph_args: list[str]) -> None:
    out = tmp_path / "run"
    assert _run(["teacher", "train", "--out", str(out), "--max-steps", "1", *tiny_glyph_args])[0] == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, _, stderr = _run(["teacher", "train", "--out", str(out), "--max-steps", "1", *tiny_glyph_args])
    assert code == 2 and "already holds a teacher run" in stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "last" / "model.safetensors"))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dmlkd", *args]


def test_sigint_then_resume_is_bit_identical(tmp_path: Path, tiny_glyph_args: list[str]) -> None:
    common = [
        "teacher",
        "train",
        "--epochs",
        "3",
        "--max-steps",
        "10",
        "--set",
        "train.save_every=1",
        "--set",
        "train.eval_every=5",
        *tiny_glyph_args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    prestarted.run(_cli(*common, "--out", str(reference)), check=True, env=env, capture_output=True)

    interrupted = tmp_path / "interrupted"
    process = prestarted.popen(
        _cli(*common, "--out", str(interrupted)),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    progress = interrupted / "state" / "progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if progress.exists() and json.loads(progress.read_text())["progress"]["global_step"] >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, stderr
    assert "resumable state saved" in stderr and "Traceback" not in stderr
    stopped_at = json.loads(progress.read_text())["progress"]["global_step"]
    assert 3 <= stopped_at < 10

    resumed = prestarted.run(
        _cli(*common, "--out", str(interrupted), "--resume"), env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    expected, actual = _weights(reference), _weights(interrupted)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    # steps.jsonl holds each step once (steps redone after the resume replace the rows logged before the stop),
    # with the reference run's losses.
    reference_rows, resumed_rows = (
        [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
        for run in (reference, interrupted)
    )
    assert [row["step"] for row in resumed_rows] == list(range(1, 11))
    assert [row["loss"] for row in resumed_rows] == [row["loss"] for row in reference_rows]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--loss", "triplett"],
            "unknown loss 'triplett'; choose from: arcmargin, contrastive, eml, margin, multi_similarity",
        ),
        (["--model", "resnet51-128"], "unknown architecture 'resnet51'"),
        (["--model", "resnet50-"], "malformed model spec 'resnet50-'"),
        (["--model", "resnet50-0"], "embedding dimension must be a positive integer"),
        (["--dataset", "cub200"], "unknown dataset 'cub200'; choose from:"),
        (["--recipe", "pa-cub-vgg"], "unknown recipe 'pa-cub-vgg'; choose from:"),
        (["--batch-size", "18", "--ipc", "4"], "batch size 18 is not a multiple of ipc 4"),
        (["--batch-size", "400", "--ipc", "4"], "batch"),
        (["--epochs", "0"], "epochs must be a positive integer"),
        (["--lr", "-0.1"], "learning rate must be positive"),
        (["--image-size", "0"], "image-size must be a positive integer"),
        (
            ["--set", "loss.kwargs.alfa=3"],
            "unknown option 'alfa' for loss 'proxy_anchor'; valid options: alpha, margin",
        ),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, tiny_glyph_args: list[str], args: list[str], message: str) -> None:
    out = tmp_path / "run"
    code, _, stderr = _run(["teacher", "train", "--out", str(out), "--max-steps", "1", *tiny_glyph_args, *args])
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert not (out / "last").exists()


def test_missing_data_root(tmp_path: Path) -> None:
    code, _, stderr = _run(
        [
            "teacher",
            "train",
            "--out",
            str(tmp_path / "run"),
            "--dataset",
            "cub",
            "--data-root",
            str(tmp_path / "nowhere"),
        ]
    )
    assert code == 2 and stderr.startswith("error: ") and "nowhere" in stderr


def test_resume_without_a_run(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, _, stderr = _run(["teacher", "train", "--out", str(tmp_path / "empty"), "--resume"])
    assert code == 2 and "holds no dmlkd run" in stderr


def test_init_from_a_pretrained_run(tmp_path: Path, tiny_glyph_args: list[str]) -> None:
    from dmlkd.teacher.trainer import initialise_from

    first = tmp_path / "pretrain"
    assert (
        _run(["teacher", "train", "--out", str(first), "--max-steps", "1", "--loss", "norm_softmax", *tiny_glyph_args])[
            0
        ]
        == 0
    )
    model = create_model("resnet18-16")
    initialise_from(model, str(first))
    trained = load_file(str(first / "last" / "model.safetensors"))
    assert all(torch.equal(model.state_dict()[key], value) for key, value in trained.items())
    code, _, stderr = _run(
        [
            "teacher",
            "train",
            "--out",
            str(tmp_path / "finetune"),
            "--max-steps",
            "1",
            "--init",
            str(first),
            *tiny_glyph_args,
        ]
    )
    assert code == 0, stderr
    record = json.loads((tmp_path / "finetune" / "last" / "config.json").read_text())
    assert record["provenance"]["init"] == str(first)
    code, _, stderr = _run(
        [
            "teacher",
            "train",
            "--out",
            str(tmp_path / "bad"),
            "--max-steps",
            "1",
            "--init",
            str(first),
            *tiny_glyph_args,
            "--model",
            "resnet18-32",
        ]
    )
    assert code == 2 and "holds a resnet18-16 model, but this run trains resnet18-32" in stderr
    # --init is checked before the run folder is touched: nothing was created.
    assert not (tmp_path / "bad").exists()
    fixed = ["teacher", "train", "--out", str(tmp_path / "bad"), "--max-steps", "1", "--init", str(first)]
    code, _, stderr = _run([*fixed, *tiny_glyph_args])
    assert code == 0, stderr
    done = json.loads((tmp_path / "bad" / "run.json").read_text())
    assert done["status"] == "finished" and "error" not in done


def test_a_failed_run_with_checkpoints_is_kept(tmp_path: Path, tiny_glyph_args: list[str]) -> None:
    out = tmp_path / "run"
    code, _, stderr = _run(["teacher", "train", "--out", str(out), "--max-steps", "1", *tiny_glyph_args])
    assert code == 0, stderr
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run, "status": "failed", "error": "a non-finite loss"}))
    code, _, stderr = _run(["teacher", "train", "--out", str(out), "--max-steps", "1", *tiny_glyph_args])
    assert code == 2 and "already holds a teacher run" in stderr and "--overwrite" in stderr
    assert (out / "last" / "model.safetensors").exists()


def test_demo_teacher_run_improves_recall_over_the_untrained_network(demo_teacher_run: Path) -> None:
    """On a 40-class glyph subset (20 training classes), 50 steps lift Recall@1 well above the untrained net
    (the run: tests/conftest.py ``DEMO_TEACHER_ARGS``, norm-softmax ResNet-18-32 for 5 epochs)."""
    out = demo_teacher_run
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert history[0]["epoch"] == 0 and history[-1]["epoch"] == 5  # the demo recipe evaluates the untrained net
    assert history[-1]["recall@1"] > history[0]["recall@1"] + 0.05, history
