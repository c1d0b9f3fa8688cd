"""The run-folder lifecycle: validation before writes, --overwrite that never destroys before success, a
resume that completes the publish sequence, one process per folder, every ending recorded, and one way to
configure a stage (config files, --print-config, shared flags).

Training runs are real subprocesses (``tests/dist_scripts/fault_run.py`` runs ``dmlkd`` and SIGKILLs itself at
a chosen phase) on a 4-class glyph subset with a resnet18-8.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from dmlkd.cli import main
from tests import prestarted

FAULT_RUN = Path(__file__).parent / "dist_scripts" / "fault_run.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
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
    "--seed",
    "3",
    "--no-progress",
    "--set",
    "eval.nmi=false",
    "--set",
    "train.eval_at_start=false",
]
# 6 steps; a state at steps 3 and 6 (the final step, before the final evaluation); one evaluation, at the end.
RUN = ["teacher", "train", *TINY, "--max-steps", "6", "--save-every", "3", "--eval-every", "2"]


def _dmlkd(*args: str, fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**ENV, **({"FAULT": fault} if fault else {})}
    return prestarted.run(
        [sys.executable, str(FAULT_RUN), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (but the lock, which only names its last holder) -> sha256."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != ".lock"
    }


def _rows(run_dir: Path) -> list[tuple[int, int]]:
    return [(r["epoch"], r["step"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def _leftovers(run_dir: Path) -> list[str]:
    return [str(p) for p in run_dir.rglob("*") if ".tmp" in p.name or p.name.startswith((".previous-", ".old-"))]


@pytest.fixture(scope="module")
def timed_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """An uninterrupted run of ``RUN`` and its wall time in seconds, start-up included."""
    run_dir = tmp_path_factory.mktemp("lifecycle") / "reference"
    started = time.perf_counter()
    done = _dmlkd(*RUN, "--out", str(run_dir))
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    return run_dir, seconds


@pytest.fixture(scope="module")
def reference(timed_reference: tuple[Path, float]) -> Path:
    return timed_reference[0]


# --------------------------------------------------------------------------- kills, then --resume


@pytest.mark.parametrize(
    "fault",
    [
        "step:2",  # mid-epoch
        "state-write:2",  # during the state write at the final step (tensors written, folder not renamed)
        "eval:1",  # during the final evaluation (state at the final step already written)
        "before-best:1",  # after last/ was published, before best/
    ],
)
def test_sigkill_at_each_phase_then_resume_equals_an_uninterrupted_run(
    reference: Path, tmp_path: Path, fault: str
) -> None:
    run_dir = tmp_path / "run"
    killed = _dmlkd(*RUN, "--out", str(run_dir), fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = _dmlkd(*RUN, "--out", str(run_dir), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    for name in ("last", "best"):
        assert _snapshot(run_dir / name) == _snapshot(reference / name), f"{name}/ differs after {fault}"
    assert _rows(run_dir) == _rows(reference) == [(2, 6)]  # each evaluation once
    assert _leftovers(run_dir) == []
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    assert "last (step 6)" in resumed.stdout


def test_ten_kills_at_random_moments_then_resume_equals_an_uninterrupted_run(
    timed_reference: tuple[Path, float], tmp_path: Path
) -> None:
    reference, duration = timed_reference  # kills land at 30-100 % of an uninterrupted run's wall time
    rng = random.Random(int(os.environ.get("DMLKD_CRASH_SEED", "11")))
    kills = 0
    fresh = tmp_path / "killed"
    args = [*RUN, "--out", str(fresh)]
    resume = False
    while kills < 10:
        process = prestarted.popen(
            [sys.executable, str(FAULT_RUN), *args, *(["--resume"] if resume else [])],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.3, 1.0) * duration)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
        record = fresh / "run.json"
        resume = record.is_file() and json.loads(record.read_text()).get("status") != "failed"
        if resume and json.loads(record.read_text()).get("status") == "finished":
            break
    final = _dmlkd(*args, *(["--resume"] if resume else []))
    assert final.returncode == 0, final.stderr
    for name in ("last", "best"):
        assert _snapshot(fresh / name) == _snapshot(reference / name)
    assert _rows(fresh) == [(2, 6)]
    assert _leftovers(fresh) == []


# --------------------------------------------------------------------------- --overwrite never destroys


def _folder_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "tiny-folder"
    from PIL import Image

    for number, label in enumerate(("a", "b", "c", "d")):
        (root / label).mkdir(parents=True)
        for index in range(3):  # every image different (duplicates are refused)
            Image.new("RGB", (24, 24), (index * 60, number * 50, 0)).save(root / label / f"{index}.png")
    return root


@pytest.mark.parametrize("case", ["data-root", "init", "batch", "nan"])
def test_a_failing_overwrite_leaves_the_previous_run_byte_identical(reference: Path, tmp_path: Path, case: str) -> None:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    before = _snapshot(run_dir)
    extra = {
        "data-root": ["--dataset", "folder", "--data-root", str(tmp_path / "no-such-folder")],
        "init": ["--init", str(tmp_path / "no-such-checkpoint")],
        "batch": ["--batch-size", "400", "--ipc", "4"],
        "nan": ["--lr", "1e30"],  # fails at step 1, after the run folder was opened
    }[case]
    result = _dmlkd(*RUN, *extra, "--out", str(run_dir), "--overwrite")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    assert _snapshot(run_dir) == before
    assert _leftovers(run_dir) == []


def test_a_failing_transfer_overwrite_leaves_the_previous_run_byte_identical(reference: Path, tmp_path: Path) -> None:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)  # a teacher run: --overwrite may replace it with a transfer run
    before = _snapshot(run_dir)
    for extra in (
        ["--teacher", str(tmp_path / "no-teacher")],
        ["--teacher", str(reference), "--dataset", "cub", "--data-root", str(tmp_path / "nowhere")],
    ):
        result = _dmlkd("transfer", "train", *extra, "--out", str(run_dir), "--overwrite", "--no-progress")
        assert result.returncode == 2, result.stderr
        assert _snapshot(run_dir) == before


def test_an_overwrite_killed_before_its_first_state_brings_the_previous_run_back(
    reference: Path, tmp_path: Path
) -> None:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    killed = _dmlkd(*RUN, "--out", str(run_dir), "--overwrite", "--seed", "4", fault="step:1")
    assert killed.returncode == -signal.SIGKILL
    assert any(p.name.startswith(".previous-") for p in run_dir.iterdir())  # set aside, not deleted
    # The next command on the folder finds the new run without progress and puts the old one back first.
    resumed = _dmlkd(*RUN, "--out", str(run_dir), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    for name in ("last", "best"):
        assert _snapshot(run_dir / name) == _snapshot(reference / name)


def test_a_successful_overwrite_replaces_the_run(reference: Path, tmp_path: Path) -> None:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    result = _dmlkd(*RUN, "--out", str(run_dir), "--overwrite", "--seed", "4")
    assert result.returncode == 0, result.stderr
    assert _snapshot(run_dir / "last") != _snapshot(reference / "last")
    assert not any(p.name.startswith(".previous-") for p in run_dir.iterdir())
    assert json.loads((run_dir / "run_config.json").read_text())["train"]["seed"] == 4


# --------------------------------------------------------------------------- one process per folder


def _start(args: list[str]) -> prestarted.Process:
    return prestarted.popen(
        [sys.executable, str(FAULT_RUN), *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_lock(run_dir: Path, process: prestarted.Process, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lock = run_dir / ".lock"
        if lock.is_file() and lock.read_text().strip() and (run_dir / "run.json").is_file():
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)
    raise AssertionError("the first run never took the lock")


def test_a_second_process_on_a_run_folder_is_refused_and_the_first_finishes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*RUN, "--out", str(run_dir), "--max-steps", "12", "--epochs", "4", "--eval-every", "4"]
    first = _start(args)
    _wait_for_lock(run_dir, first)
    second = _dmlkd(*args, "--overwrite")
    third = _dmlkd(*args, "--resume")
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    for other in (second, third):
        assert other.returncode == 2
        line = other.stderr.strip()
        assert line.startswith("error: run folder") and f"in use by process {first.pid}" in line, line
        assert len(line.splitlines()) == 1
    assert _rows(run_dir) == [(3, 12)]  # one row, not interleaved ones (12 steps = 3 epochs of 4)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    killed = _dmlkd(*RUN, "--out", str(run_dir), fault="step:4")
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((run_dir / ".lock").read_text())["pid"] > 0  # the dead holder is still named
    resumed = _dmlkd(*RUN, "--out", str(run_dir), "--resume")
    assert resumed.returncode == 0, resumed.stderr


# --------------------------------------------------------------------------- endings, flags, settings


def test_ctrl_c_and_sigterm_are_recorded_as_interrupted(tmp_path: Path) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        run_dir = tmp_path / f"run-{signum}"
        process = _start([*RUN, "--out", str(run_dir), "--max-steps", "400", "--epochs", "200"])
        deadline = time.monotonic() + 120
        while not (run_dir / "state").is_dir() and time.monotonic() < deadline:  # in the training loop
            time.sleep(0.1)
        process.send_signal(signum)
        _, err = process.communicate(timeout=120)
        assert process.returncode == 128 + signum, err
        record = json.loads((run_dir / "run.json").read_text())
        assert record["status"] == "interrupted" and record["stopped_at_step"] > 0


def test_contradictory_flags_are_one_line_errors(reference: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, [*RUN, "--out", str(reference), "--resume", "--overwrite"])
    assert result.exit_code == 2 and "--resume and --overwrite contradict" in result.output
    result = runner.invoke(
        main,
        [
            "transfer",
            "train",
            "--teacher",
            str(reference),
            "--teacher-mode",
            "clean",
            "--cache-views",
            "3",
            "--out",
            "t",
        ],
    )
    assert result.exit_code == 2 and "--cache-views applies to the cached teacher only" in result.output
    assert not Path("t").exists()


def test_display_settings_may_differ_on_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    killed = _dmlkd(*RUN, "--out", str(run_dir), fault="step:2")
    assert killed.returncode == -signal.SIGKILL
    args = [a for a in RUN if a != "--no-progress"]
    resumed = _dmlkd(*args, "--out", str(run_dir), "--resume", "--num-workers", "1")
    assert resumed.returncode == 0, resumed.stderr
    # ...but an option that changes results may not.
    refused = _dmlkd(*RUN, "--out", str(run_dir), "--resume", "--lr", "0.5")
    assert refused.returncode == 2 and "optim.lr=0.5 differs" in refused.stderr


# --------------------------------------------------------------------------- configuration


def _print_config(args: list[str]) -> str:
    result = CliRunner().invoke(main, [*args, "--print-config"])
    assert result.exit_code == 0, result.output
    return result.output


def test_print_config_then_config_reproduces_run_config_json(reference: Path, tmp_path: Path) -> None:
    teacher_yaml = tmp_path / "teacher.yaml"
    teacher_yaml.write_text(_print_config([*RUN]))
    run_dir = tmp_path / "from-file"
    result = _dmlkd("teacher", "train", "--config", str(teacher_yaml), "--out", str(run_dir))
    assert result.returncode == 0, result.stderr
    saved = json.loads((reference / "run_config.json").read_text())
    assert json.loads((run_dir / "run_config.json").read_text()) == saved
    assert yaml.safe_load(teacher_yaml.read_text()) == saved

    transfer = ["transfer", "train", "--teacher", str(reference / "last"), "--student", "resnet18-8"]
    transfer += [*TINY[2:], "--max-steps", "2", "--method", "rkd"]
    transfer_yaml = tmp_path / "transfer.yaml"
    transfer_yaml.write_text(_print_config(transfer))
    runs = []
    for name, args in (("flags", transfer), ("file", ["transfer", "train", "--config", str(transfer_yaml)])):
        result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        runs.append(json.loads((tmp_path / name / "run_config.json").read_text()))
    assert runs[0] == runs[1] == yaml.safe_load(transfer_yaml.read_text())
    assert runs[0]["method"] == {"name": "rkd", "kwargs": {}}  # the recipe's sigma/delta did not follow


def test_pipeline_print_config_round_trip_equals_pipeline_json(tmp_path: Path) -> None:
    args = ["pipeline", "compress", "--src", "resnet18-8", "--dst", "resnet18-8", "--methods", "rkd,pkt"]
    args += ["--set", "data.options.max_classes=4", "--teacher-epochs", "1", "--epochs", "1", "--max-steps", "1"]
    args += ["--batch-size", "16", "--no-pretrained", "--seed", "5", "--lr", "0.002", "--teacher-lr", "0.003"]
    args += ["--no-progress", "--set", "teacher.train.ipc=8", "--set", "transfer.train.ipc=8"]
    args += ["--set", "teacher.eval.nmi=false", "--set", "transfer.eval.nmi=false"]
    pipeline_yaml = tmp_path / "pipeline.yaml"
    pipeline_yaml.write_text(_print_config(args))
    printed = yaml.safe_load(pipeline_yaml.read_text())
    assert printed["transfer"]["optim"]["lr"] == 0.002 and printed["teacher"]["optim"]["lr"] == 0.003
    assert printed["teacher"]["train"]["seed"] == printed["transfer"]["train"]["seed"] == 5
    result = CliRunner().invoke(
        main, ["pipeline", "compress", "--config", str(pipeline_yaml), "--out", str(tmp_path / "p")]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "p" / "pipeline.json").read_text())["config"] == printed
    # Rerunning the finished pipeline is a no-op: no training, no report rewrite, no torch import.
    report = (tmp_path / "p" / "report.md").stat().st_mtime_ns
    code = (
        "import sys; from dmlkd.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as stop:\n"
        "    assert 'torch' not in sys.modules, 'torch was imported'\n    raise\n"
    )
    again = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "pipeline",
            "compress",
            "--config",
            str(pipeline_yaml),
            "--out",
            str(tmp_path / "p"),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    assert (tmp_path / "p" / "report.md").stat().st_mtime_ns == report


def test_the_pipeline_trains_every_embedding_method(tmp_path: Path) -> None:
    """The README's example shape (relaxed contrastive plus methods with other options) trains each student."""
    args = ["pipeline", "compress", "--src", "resnet18-8", "--dst", "resnet18-8"]
    args += ["--methods", "relaxed_contrastive,rkd,pkt,darkrank", "--set", "data.options.max_classes=4"]
    args += ["--teacher-epochs", "1", "--epochs", "1", "--max-steps", "1", "--batch-size", "16", "--no-progress"]
    args += ["--set", "teacher.train.ipc=8", "--set", "transfer.train.ipc=8", "--out", str(tmp_path / "p")]
    args += ["--set", "teacher.eval.nmi=false", "--set", "transfer.eval.nmi=false"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    steps = json.loads((tmp_path / "p" / "pipeline.json").read_text())["steps"]
    for method in ("relaxed_contrastive", "rkd", "pkt", "darkrank"):
        assert steps[f"student:{method}"]["status"] == "done"
        saved = json.loads((tmp_path / "p" / "students" / method / "run_config.json").read_text())
        assert saved["method"]["name"] == method
    rkd = json.loads((tmp_path / "p" / "students" / "rkd" / "run_config.json").read_text())
    assert "sigma" not in rkd["method"]["kwargs"]


def test_stage_and_pipeline_commands_share_their_run_flags() -> None:
    from dmlkd.cli.options import shared_flag_names

    commands = {
        "teacher train": main.commands["teacher"].commands["train"],
        "transfer train": main.commands["transfer"].commands["train"],
        **{f"pipeline {n}": c for n, c in main.commands["pipeline"].commands.items()},
    }
    helps: dict[str, dict[str, str | None]] = {}
    for label, command in commands.items():
        options = {opt: param.help for param in command.params for opt in [*param.opts, *param.secondary_opts]}
        missing = [name for name in shared_flag_names() if name not in options]
        assert not missing, f"{label} lacks {missing}"
        helps[label] = {name: options[name] for name in shared_flag_names()}
    first = next(iter(helps.values()))
    for label, values in helps.items():
        assert values == first, f"{label}: help text differs from the other training commands"
    # ... and in the same order in --help: the command's own options first, then --out/--resume/--overwrite,
    # then the run options.
    listed = {"--out", "--resume", "--overwrite", *shared_flag_names()}
    orders = {
        label: [opt for param in command.params for opt in param.opts if opt in listed]
        for label, command in commands.items()
        if label in ("teacher train", "transfer train")
    }
    assert orders["transfer train"] == orders["teacher train"], orders


def test_from_scratch_backbones_do_not_get_a_recipes_bn_freeze(tmp_path: Path) -> None:
    folder = _folder_dataset(tmp_path)  # any folder dataset: the PA defaults apply (bn_freeze, warm-up 1)
    args = ["teacher", "train", "--dataset", "folder", "--data-root", str(folder), "--model", "resnet18-8"]
    printed = yaml.safe_load(_print_config([*args, "--no-pretrained", "--batch-size", "4"]))
    assert printed["optim"]["bn_freeze"] is False and printed["optim"]["warmup_epochs"] == 0
    explicit = [*args, "--no-pretrained", "--batch-size", "4", "--set", "optim.bn_freeze=true"]
    result = CliRunner().invoke(main, [*explicit, "--max-steps", "1", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output  # asked for explicitly: kept, with a warning
    assert "note: warning: optim.bn_freeze=true freezes the BatchNorm statistics" in result.output
    assert json.loads((tmp_path / "r" / "run_config.json").read_text())["optim"]["bn_freeze"] is True


def test_augmentation_settings_are_config_fields_shown_in_run_config(reference: Path, tmp_path: Path) -> None:
    saved = json.loads((reference / "run_config.json").read_text())
    assert saved["train"]["flip_p"] == 0.0  # the glyph reader's default, resolved and shown
    assert saved["train"]["crop_scale"] == [0.6, 1.0] and saved["eval"]["resize_ratio"] == 1.0
    printed = yaml.safe_load(_print_config([*RUN, "--set", "train.flip_p=0.5", "--set", "train.crop_ratio=[0.9,1.1]"]))
    assert printed["train"]["flip_p"] == 0.5 and printed["train"]["crop_ratio"] == [0.9, 1.1]
    from dmlkd.data.catalog import build_splits
    from dmlkd.data.training import augmentation
    from dmlkd.teacher.config import TeacherConfig

    config = TeacherConfig(**{})
    splits, _ = build_splits(config.data.__class__(name="glyphs", options={"max_classes": 4}))
    views = augmentation(config.train.__class__(flip_p=0.25, crop_ratio=[0.5, 2.0]), splits)
    assert views.flip_p == 0.25 and views.ratio == (0.5, 2.0) and views.scale == (0.6, 1.0)


def test_names_are_checked_before_torch_and_debug_works_anywhere(tmp_path: Path) -> None:
    code = (
        "import sys; from dmlkd.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
        "    print('torch' in sys.modules)\n"
    )
    for args in (["--recipe", "nope"], ["--model", "resnet50"]):
        result = subprocess.run(
            [sys.executable, "-c", code, "teacher", "train", *args, "--out", str(tmp_path / "x")],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.stdout.strip() == "False", result.stderr
        assert result.stderr.startswith("error:")
    result = CliRunner().invoke(main, ["teacher", "train", "--recipe", "nope", "--out", str(tmp_path), "--debug"])
    assert result.exit_code != 0 and "unknown recipe" in str(result.exception)
    listing = CliRunner().invoke(main, ["recipes"])
    assert listing.exit_code == 0 and "pa-cub-bninception" in listing.output and "lr-cub" in listing.output


def test_a_finished_run_drops_its_state_and_resume_has_nothing_to_do(reference: Path, tmp_path: Path) -> None:
    import shutil

    assert not (reference / "state").exists()
    assert json.loads((reference / "run.json").read_text())["state_dropped"] is True
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    before = _snapshot(run_dir)
    again = _dmlkd(*RUN, "--out", str(run_dir), "--resume")
    assert again.returncode == 0, again.stderr
    assert "has finished; nothing to do" in again.stderr and "last (step 6)" in again.stdout
    assert _snapshot(run_dir) == before
    kept = _dmlkd(*RUN, "--out", str(tmp_path / "kept"), "--set", "train.keep_state=true")
    assert kept.returncode == 0, kept.stderr
    assert (tmp_path / "kept" / "state" / "progress.json").is_file()


def test_pipeline_transfer_set_flag_reaches_the_students(tmp_path: Path) -> None:
    folder = _folder_dataset(tmp_path)
    printed = yaml.safe_load(_print_config(["pipeline", "compress", "--transfer-set", str(folder)]))
    assert printed["transfer"]["transfer_set"] == str(folder)
    assert printed["transfer"]["train"]["ipc"] is None  # unlabeled images: random batches
    assert printed["teacher"]["train"]["ipc"] == 4  # the teacher still trains on the labelled split
