"""Crash safety: SIGKILL and resume, atomic state writes, non-finite losses, determinism, no pickle.

Training runs here are real ``python -m dmlkd`` subprocesses on a 4-class glyph subset (2 training classes,
4 steps per epoch) with a resnet18-8, killed with SIGKILL (no handler can run) at chosen and at random moments.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dmlkd.checkpoints.folder import save_checkpoint
from dmlkd.checkpoints.io import load_checkpoint
from dmlkd.cli import main
from dmlkd.config import from_dict
from dmlkd.engine.optim import build_optimizer, build_scheduler
from dmlkd.engine.state import Progress, enable_determinism, has_state, load_state, save_state
from dmlkd.errors import CheckpointError
from dmlkd.models import build_model, create_model
from dmlkd.teacher.config import TeacherConfig
from dmlkd.teacher.module import TeacherModule, build_criterion
from dmlkd.teacher.trainer import param_groups
from tests import prestarted

STEPS = 6
TINY = [
    "--model",
    "resnet18-8",
    "--dataset",
    "glyphs",
    "--set",
    "data.options.max_classes=4",
    "--batch-size",
    "16",
    "--ipc",
    "8",
    "--epochs",
    "2",
    "--eval-every",
    "1",
    "--seed",
    "3",
    "--no-progress",
    "--set",
    "eval.nmi=false",
    "--set",
    "train.eval_at_start=false",
]
CRASH_RUN = ["teacher", "train", *TINY, "--max-steps", str(STEPS), "--save-every", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
DEADLINE = 400.0


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dmlkd", *args]


def _tensors(folder: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


def _assert_identical(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor], what: str) -> None:
    assert expected.keys() == actual.keys(), what
    for key in expected:
        assert torch.equal(expected[key], actual[key]), f"{what}: {key} differs"


def _metrics(run: Path) -> list[dict[str, Any]]:
    """metrics.jsonl entries without the timing field."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "eval_seconds"} for line in lines if line]


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two uninterrupted runs with the same seed, started side by side."""
    root = tmp_path_factory.mktemp("reference")
    runs = (root / "first", root / "second")
    processes = [
        prestarted.popen(_cli(*CRASH_RUN, "--out", str(run)), env=ENV, stderr=subprocess.PIPE, text=True)
        for run in runs
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=DEADLINE)
        assert process.returncode == 0, stderr
    return runs


def test_same_seed_gives_identical_metrics_and_weights(reference_runs: tuple[Path, Path]) -> None:
    first, second = reference_runs
    assert [entry["step"] for entry in _metrics(first)] == [4, STEPS]
    assert _metrics(first) == _metrics(second)
    for name in ("model.safetensors", "loss.safetensors"):
        _assert_identical(_tensors(first / "last", name), _tensors(second / "last", name), name)


# --------------------------------------------------------------------------------------------- SIGKILL


def _saved_step(run: Path) -> int:
    try:
        return json.loads((run / "state" / "progress.json").read_text())["progress"]["global_step"]
    except (OSError, ValueError, KeyError):
        return -1


def _wait_for(condition: Any, process: prestarted.Process, what: str, may_end: bool = False) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if may_end and process.poll() is not None:
            return
        assert process.poll() is None, f"the run ended before {what}: {process.communicate()[1]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def _kill(process: prestarted.Process) -> None:
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)


def _load_resumable_state(run: Path) -> Progress:
    """Restore ``state/`` into a freshly built module, optimiser and scheduler, as ``--resume`` does."""
    config = from_dict(TeacherConfig, json.loads((run / "run_config.json").read_text()))
    model = build_model(dataclasses.replace(config.model, pretrained=False))
    module = TeacherModule(model, build_criterion(config, num_classes=2), config.loss.name)
    optimizer = build_optimizer(param_groups(module, config), config.optim)
    scheduler = build_scheduler(optimizer, config.optim, config.train.epochs)
    progress, _ = load_state(run / "state", module, optimizer, scheduler)
    return progress


def _check_loadable(run: Path, at_most: int) -> int:
    """What a kill left must load: ``state/`` strictly, and ``last/`` when it was written already."""
    progress = _load_resumable_state(run)
    assert 1 <= progress.global_step <= at_most
    if (run / "last").exists():  # written after the evaluation at the end of epoch 1 (step 4)
        model, record = load_checkpoint(run / "last")
        assert record["metrics"]["step"] in (4, STEPS) and model.config.embedding_dim == 8
    assert not list(run.glob(".state.*")), "leftovers of the interrupted write are cleaned on load"
    return progress.global_step


def _start(run: Path, resume: bool) -> prestarted.Process:
    args = [*CRASH_RUN, "--out", str(run), *(["--resume"] if resume else [])]
    return prestarted.popen(_cli(*args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_sigkill_during_writes_and_at_random_then_resume_is_bit_identical(
    reference_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    seed = int(os.environ.get("DMLKD_CRASH_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    run = tmp_path / "killed"

    # 1. SIGKILL while state/ is being rewritten (its temporary folder exists) at a random step >= 2.
    target = rng.randint(2, 4)
    process = _start(run, resume=False)
    _wait_for(lambda: _saved_step(run) >= target - 1 and any(run.glob(".state.tmp-*")), process, "a state write")
    before_kill = _saved_step(run)
    _kill(process)
    resumed_from = _check_loadable(run, at_most=before_kill + 1)
    assert resumed_from >= before_kill, f"seed {seed}: the previous state was lost"

    # 2. Resume, then SIGKILL at a random moment after it made progress (mid-step, mid-write or mid-eval).
    process = _start(run, resume=True)
    _wait_for(lambda: _saved_step(run) > resumed_from, process, "progress after resuming", may_end=True)
    time.sleep(rng.uniform(0.0, 1.5))
    if process.poll() is None:
        _kill(process)
    _check_loadable(run, at_most=STEPS)

    # 3. Resume to the end: the weights equal those of the uninterrupted run, bit for bit.
    process = _start(run, resume=True)
    _, stderr = process.communicate(timeout=DEADLINE)
    assert process.returncode == 0, f"seed {seed}: {stderr}"
    reference = reference_runs[0]
    for name in ("model.safetensors", "loss.safetensors"):
        _assert_identical(_tensors(reference / "last", name), _tensors(run / "last", name), f"seed {seed} {name}")
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "finished" and record["global_step"] == STEPS
    assert not (run / "state").exists()  # a finished run drops its resumable state (train.keep_state=false)


def test_a_state_swap_cut_short_is_repaired(tmp_path: Path) -> None:
    """A kill between the two renames of an atomic write leaves only ``.state.old-*``: it is moved back."""
    model = create_model("googlenet-8")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    save_state(tmp_path / "state", model, optimizer, scheduler, Progress(global_step=7))
    (tmp_path / "state").rename(tmp_path / ".state.old-1234abcd")
    (tmp_path / ".state.tmp-5678abcd").mkdir()
    (tmp_path / ".state.tmp-5678abcd" / "tensors.safetensors").write_bytes(b"half a file")
    assert has_state(tmp_path / "state")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["state"]
    progress, _ = load_state(tmp_path / "state", model, optimizer, scheduler)
    assert progress.global_step == 7


# --------------------------------------------------------------------------------------------- non-finite loss


@dataclasses.dataclass
class Poison:
    """The steps (0-based forward calls) whose loss becomes NaN, and a hook called when one is poisoned."""

    steps: list[int]
    hook: Any = None


@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch) -> Iterator[Poison]:
    plan = Poison([])
    calls = {"count": 0}
    original = TeacherModule.forward

    def forward(self: TeacherModule, batch: Any, replay_k: Any = None) -> dict[str, torch.Tensor]:
        terms = original(self, batch, replay_k)
        step, calls["count"] = calls["count"], calls["count"] + 1
        if step in plan.steps:
            if plan.hook is not None:
                plan.hook()
            poisoned = terms["loss"] * float("nan")
            terms = {"loss": poisoned, self.loss_name: poisoned.detach()}
        return terms

    monkeypatch.setattr(TeacherModule, "forward", forward)
    yield plan


def _fingerprint(folder: Path) -> dict[str, tuple[int, int, str]]:
    return {
        path.name: (path.stat().st_size, path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        for path in sorted(folder.iterdir())
    }


def test_nonfinite_loss_stops_naming_step_and_terms_and_keeps_last(tmp_path: Path, poison: Poison) -> None:
    run = tmp_path / "run"
    before: dict[str, Any] = {}
    poison.steps.append(5)  # epoch 1 (steps 0-3) ends with last/ at step 4; step 5 is poisoned
    poison.hook = lambda: before.update(_fingerprint(run / "last"))
    result = CliRunner().invoke(main, ["teacher", "train", *TINY, "--max-steps", "8", "--out", str(run)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert lines[0] == (
        "error: non-finite loss at step 5: loss=nan, proxy_anchor=nan; checkpoints saved before it are kept "
        "(lower the learning rate, or --set train.on_nonfinite=skip to skip such steps)"
    )
    assert before and _fingerprint(run / "last") == before  # last/ as it was before the bad step
    model, record = load_checkpoint(run / "last")
    assert record["metrics"]["step"] == 4 and torch.isfinite(model.embedding.weight).all()
    assert _saved_step(run) == 4  # the resumable state of the end of epoch 1
    assert [entry["step"] for entry in _metrics(run)] == [4]


def test_skipped_nonfinite_steps_are_counted_in_the_log(
    tmp_path: Path, poison: Poison, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    poison.steps.extend([1, 2])
    args = ["teacher", "train", *TINY, "--max-steps", "4", "--out", str(run), "--set", "train.on_nonfinite=skip"]
    args += ["--set", "train.keep_state=true"]
    with caplog.at_level(logging.WARNING, logger="dmlkd.engine.loop"):
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.stderr
    messages = [record.getMessage() for record in caplog.records if "skipped" in record.getMessage()]
    assert messages == [
        "skipped step 1: non-finite loss; 1 step(s) skipped in this run so far",
        "skipped step 2: non-finite loss; 2 step(s) skipped in this run so far",
    ]
    progress = json.loads((run / "state" / "progress.json").read_text())["progress"]
    assert progress["skipped_steps"] == 2 and progress["global_step"] == 4


# --------------------------------------------------------------------------------------------- determinism


def test_enable_determinism_sets_the_flag() -> None:
    before = torch.are_deterministic_algorithms_enabled()
    try:
        enable_determinism(torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)


def test_deterministic_and_save_every_flags_are_accepted_and_recorded(tmp_path: Path) -> None:
    before = torch.are_deterministic_algorithms_enabled()
    run = tmp_path / "teacher"
    try:
        args = ["teacher", "train", *TINY, "--max-steps", "2", "--out", str(run), "--deterministic"]
        result = CliRunner().invoke(main, [*args, "--save-every", "1"])
        assert result.exit_code == 0, result.stderr
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)
    saved = json.loads((run / "run_config.json").read_text())["train"]
    assert saved["deterministic"] is True and saved["save_every"] == 1
    assert json.loads((run / "last" / "config.json").read_text())["train_config"]["train"]["deterministic"] is True

    torch.manual_seed(0)
    teacher = save_checkpoint(tmp_path / "tiny-teacher", create_model("googlenet-8"))
    student = tmp_path / "student"
    args = [
        "transfer", "train", "--teacher", str(teacher), "--student", "googlenet-8", "--teacher-mode", "online",
        *TINY[2:], "--max-steps", "1", "--out", str(student), "--deterministic", "--save-every", "1",
    ]  # fmt: skip
    try:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.stderr
    finally:
        torch.use_deterministic_algorithms(before)
    saved = json.loads((student / "run_config.json").read_text())["train"]
    assert saved["deterministic"] is True and saved["save_every"] == 1
    default = json.loads((tmp_path / "student" / "last" / "config.json").read_text())
    assert default["train_config"]["train"]["deterministic"] is True


# --------------------------------------------------------------------------------------------- no pickle


class _Booby:
    """Unpickling this object creates the marker file (it calls ``open(marker, "w")``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_pickle_in_a_checkpoint_folder_is_rejected_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps({"embedding.weight": _Booby(marker)})
    torch.manual_seed(0)
    good = save_checkpoint(tmp_path / "good", create_model("googlenet-8"))
    config = (good / "config.json").read_text()

    only_pickle = tmp_path / "only-pickle"
    only_pickle.mkdir()
    (only_pickle / "model.bin").write_bytes(payload)
    (only_pickle / "model.pth").write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"holds no checkpoint: expected config\.json"):
        load_checkpoint(only_pickle)

    beside_config = tmp_path / "pickle-beside-config"
    beside_config.mkdir()
    (beside_config / "config.json").write_text(config)
    (beside_config / "model.pth").write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        load_checkpoint(beside_config)

    renamed = tmp_path / "pickle-named-safetensors"  # even with a matching digest it is never unpickled
    renamed.mkdir()
    (renamed / "model.safetensors").write_bytes(payload)
    record = json.loads(config)
    record["files"]["model.safetensors"] = hashlib.sha256(payload).hexdigest()
    (renamed / "config.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(renamed)

    # `dmlkd convert` reads reference .pth files with weights_only=True: the call to open() is refused.
    (tmp_path / "reference.pth").write_bytes(pickle.dumps({"model_state_dict": _Booby(marker)}, protocol=2))
    args = ["convert", str(tmp_path / "reference.pth"), "--model", "resnet50-512", "--dataset", "cub"]
    result = prestarted.run(
        _cli(*args, "--out", str(tmp_path / "converted")), env=ENV, capture_output=True, text=True, timeout=DEADLINE
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: refusing") and "open" in lines[0] and "weights_only" in lines[0]
    assert not marker.exists(), "a pickle was unpickled"
    assert not (tmp_path / "converted").exists()
