"""The transfer stage end to end: every method, teacher modes, the teacher cache, errors and exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import dmlkd
from dmlkd.cli import main
from dmlkd.models import create_model
from dmlkd.registry import TRANSFER_METHODS
from dmlkd.transfer.base import ModelInfo, TransferContext
from dmlkd.transfer.cache.teacher_cache import describe_cache, teacher_digest
from tests import prestarted
from tests.conftest import TINY_GLYPH_DATA

STUDENT = "resnet18-8"
# Tiny runs: the shared 16-class glyph subset (4 classes x 4 images x 2 views per step), 2 steps, no NMI.
TINY = TINY_GLYPH_DATA
# Keeps CRD's negatives per row small; every other method runs with its defaults.
METHOD_OPTIONS = {"crd": ["--set", "method.kwargs.nce_k=64"]}


def _run(args: list[str]) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of the CLI run in-process."""
    result = CliRunner().invoke(main, args)
    stderr = result.stderr
    if result.exc_info is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return result.exit_code, result.stdout, stderr


def _one_line_error(code: int, stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, stderr)
    return lines[0]


@pytest.fixture(scope="module")
def teacher(tiny_teacher_run: Path) -> Path:
    """The session's tiny resnet18-16 teacher (2 steps, the options of ``TINY``), read only."""
    return tiny_teacher_run


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("teacher-cache")


def _transfer(out: Path, teacher: Path | None, cache_dir: Path, *extra: str, steps: int = 2) -> list[str]:
    teacher_args = ["--teacher", str(teacher)] if teacher is not None else []
    return [
        "transfer",
        "train",
        "--out",
        str(out),
        *teacher_args,
        "--student",
        STUDENT,
        "--max-steps",
        str(steps),
        *TINY,
        "--set",
        f"teacher.cache_dir={cache_dir}",
        *extra,
    ]


def _record(out: Path, name: str = "last") -> dict:
    return json.loads((out / name / "config.json").read_text())


def _has_state(method: str) -> bool:
    """Whether the method owns tensors (regressors, memory, proxies), built independently of the trainer."""
    info = ModelInfo.from_model(create_model(STUDENT))
    teacher_info = ModelInfo.from_model(create_model("resnet18-16"))
    built = TRANSFER_METHODS.build(
        method,
        TransferContext(info, teacher_info, num_classes=8, num_train=64, num_views=2),
        **({"nce_k": 64} if method == "crd" else {}),
    )
    return len(built.state_dict()) > 0


@pytest.mark.parametrize("method", TRANSFER_METHODS.names())
def test_every_method_trains_end_to_end(tmp_path: Path, teacher: Path, shared_cache: Path, method: str) -> None:
    out = tmp_path / "student"
    expected_mode = "cached" if TRANSFER_METHODS.get(method).cacheable else "online"
    mode = ["--teacher-mode", expected_mode]  # auto runs a 2-step run online (cheaper than the cache)
    code, stdout, stderr = _run(
        _transfer(out, teacher, shared_cache, "--method", method, *METHOD_OPTIONS.get(method, []), *mode)
    )
    assert code == 0, stderr
    assert f"teacher mode: {expected_mode}" in stdout
    for name in ("last", "best"):
        assert (out / name / "model.safetensors").is_file()
        assert (out / name / "method.safetensors").is_file() == _has_state(method)
    record = _record(out)
    teacher_record = json.loads((teacher / "last" / "config.json").read_text())  # a run folder means its last/
    provenance = record["provenance"]
    assert provenance["teacher"] == str(teacher) and provenance["teacher_mode"] == expected_mode
    assert provenance["teacher_digest"] == teacher_record["files"]["model.safetensors"]
    assert provenance["method"] == method and record["metrics"]["step"] == 2
    if _has_state(method):
        saved = load_file(str(out / "last" / "method.safetensors"))
        assert saved and all(torch.isfinite(value.float()).all() for value in saved.values())
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "finished" and status["teacher_mode"] == expected_mode
    model = dmlkd.load(str(out))
    embedding = model(torch.rand(2, 3, 32, 32)).embedding
    assert embedding.shape == (2, 8)


@pytest.mark.parametrize("method", ["fitnet", "attention"])
def test_feature_methods_refuse_a_cache(tmp_path: Path, teacher: Path, shared_cache: Path, method: str) -> None:
    out = tmp_path / "student"
    code, _, stderr = _run(_transfer(out, teacher, shared_cache, "--method", method, "--teacher-mode", "cached"))
    line = _one_line_error(code, stderr)
    assert method in line and "feature maps" in line and "--teacher-mode online" in line
    assert not out.exists()


def test_fitnet_between_incompatible_architectures(tmp_path: Path, teacher: Path, shared_cache: Path) -> None:
    out = tmp_path / "student"
    args = _transfer(out, teacher, shared_cache, "--method", "fitnet")
    args[args.index(STUDENT)] = "bn_inception-8"
    line = _one_line_error(*_run(args)[::2])
    assert "bn_inception" in line and "resnet18" in line and "taps" in line


@pytest.mark.parametrize("mode", ["online", "cached", "clean"])
def test_relaxed_contrastive_in_every_teacher_mode(tmp_path: Path, teacher: Path, mode: str) -> None:
    out, cache_dir = tmp_path / "student", tmp_path / "cache"
    code, stdout, stderr = _run(_transfer(out, teacher, cache_dir, "--teacher-mode", mode))
    assert code == 0, stderr
    assert f"teacher mode: {mode}" in stdout and _record(out)["provenance"]["teacher_mode"] == mode
    cache_files = sorted(cache_dir.glob("*.safetensors")) if cache_dir.exists() else []
    assert len(cache_files) == (0 if mode == "online" else 1)
    if cache_files:
        description = describe_cache(cache_files[0])
        assert description["mode"] == mode and description["num_sets"] == (8 if mode == "cached" else 1)


def _files(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in sorted(folder.iterdir())}


def test_cache_is_built_once_reused_and_rebuilt_for_other_views(tmp_path: Path, teacher: Path) -> None:
    cache_dir = tmp_path / "cache"
    build = [
        "cache",
        "build",
        "--teacher",
        str(teacher),
        "--student",
        STUDENT,
        *TINY,
        "--set",
        f"teacher.cache_dir={cache_dir}",
    ]
    code, stdout, stderr = _run(build)
    assert code == 0, stderr
    description = json.loads(stdout)
    built = _files(cache_dir)
    assert list(built) == [Path(description["path"]).name]
    assert description["mode"] == "cached" and description["num_sets"] == 8 and description["embedding_dim"] == 16
    assert description["teacher_digest"] == teacher_digest(teacher)  # weights and model config

    for name in ("first", "second"):  # both training runs replay the file `cache build` wrote
        code, _, stderr = _run(_transfer(tmp_path / name, teacher, cache_dir, "--teacher-mode", "cached", steps=1))
        assert code == 0, stderr
        assert _files(cache_dir) == built

    third = _transfer(tmp_path / "third", teacher, cache_dir, "--cache-views", "2", "--teacher-mode", "cached", steps=1)
    code, _, stderr = _run(third)
    assert code == 0, stderr
    after = _files(cache_dir)
    assert len(after) == 2 and {k: v for k, v in after.items() if k in built} == built
    (new_file,) = set(after) - set(built)
    assert describe_cache(cache_dir / new_file)["num_sets"] == 2


def test_cache_build_refuses_online_mode(teacher: Path, tmp_path: Path) -> None:
    code, _, stderr = _run(
        [
            "cache",
            "build",
            "--teacher",
            str(teacher),
            "--method",
            "fitnet",
            *TINY,
            "--set",
            f"teacher.cache_dir={tmp_path}",
        ]
    )
    assert "online uses no cache" in _one_line_error(code, stderr)


def test_missing_teacher_is_one_line(tmp_path: Path, shared_cache: Path) -> None:
    out = tmp_path / "student"
    line = _one_line_error(*_run(_transfer(out, tmp_path / "nowhere", shared_cache))[::2])
    assert "nowhere" in line and "does not exist" in line
    line = _one_line_error(*_run(_transfer(out, None, shared_cache))[::2])
    assert "no teacher given" in line and "--teacher" in line
    assert not out.exists()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dmlkd", *args]


def _wait_for_step(progress: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if progress.exists() and json.loads(progress.read_text())["progress"]["global_step"] >= step:
            return
        time.sleep(0.05)


def test_sigint_then_resume_is_bit_identical_with_cached_teacher(
    tmp_path: Path, teacher: Path, shared_cache: Path
) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(out: Path, *extra: str) -> list[str]:
        args = _transfer(
            out,
            teacher,
            shared_cache,
            "--epochs",
            "3",
            "--set",
            "train.save_every=1",
            "--set",
            "train.eval_every=5",
            "--teacher-mode",
            "cached",
            *extra,
            steps=8,
        )
        return _cli(*args)

    reference = tmp_path / "reference"
    code, _, stderr = _run(command(reference)[3:])  # uninterrupted, in-process
    assert code == 0, stderr
    assert _record(reference)["provenance"]["teacher_mode"] == "cached"

    interrupted = tmp_path / "interrupted"
    process = prestarted.popen(command(interrupted), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    progress = interrupted / "state" / "progress.json"
    _wait_for_step(progress, 3)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, stderr
    assert "resumable state saved" in stderr and "Traceback" not in stderr
    stopped_at = json.loads(progress.read_text())["progress"]["global_step"]
    assert 3 <= stopped_at < 8

    code, _, stderr = _run(command(interrupted, "--resume")[3:])
    assert code == 0, stderr
    expected = load_file(str(reference / "last" / "model.safetensors"))
    actual = load_file(str(interrupted / "last" / "model.safetensors"))
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
