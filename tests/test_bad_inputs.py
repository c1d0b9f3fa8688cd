"""The catalogue of bad input, run through the real ``dmlkd`` CLI as a user meets it (docs/errors.md).

Every case runs ``python -m dmlkd ...`` in a subprocess and must exit non-zero with ONE readable stderr line
``error: ...`` that names the bad value and what would be valid (no traceback), and must leave every file that
existed before untouched (path, size, mtime_ns, and sha256 for small files; big tensor files by size and
mtime). New files may appear only under the case's own ``--out``. The cases run in a small thread pool (each
subprocess pays ~3 s of imports); the results are then checked one parametrized test per case.

A teacher cache built for another teacher is the one case that succeeds: it is detected, logged and rebuilt
(``test_foreign_teacher_cache_is_rebuilt_not_used``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dmlkd.checkpoints import save_checkpoint
from dmlkd.models import create_model

SMALL_FILE = 64 * 1024  # files up to this size are also compared by sha256
WORKERS = 3
TIMEOUT = 240
HUB_REPO = "dmlkd-test/tiny-embedder"
GLYPHS = ["--dataset", "glyphs", "--set", "data.options.max_classes=16", "--no-progress"]
TEACHER_TINY = ["--model", "resnet18-8", *GLYPHS, "--batch-size", "16", "--ipc", "4", "--max-steps", "1"]


@dataclass(frozen=True)
class Case:
    """One bad input: the CLI arguments (``{name}`` placeholders are paths of the world) and what the line names.

    ``expect`` are substrings of the error line, typically the bad value and the valid choices or the fix.
    ``out`` is the one path (placeholder) below which the failing command may create files.
    """

    args: tuple[str, ...]
    expect: tuple[str, ...]
    out: str | None = None
    env: dict[str, str] = field(default_factory=dict)


def _teacher(*args: str) -> tuple[str, ...]:
    return ("teacher", "train", "--out", "{out}", *TEACHER_TINY, *args)


def _transfer(*args: str, teacher: str = "{ckpt}") -> tuple[str, ...]:
    return ("transfer", "train", "--teacher", teacher, "--student", "resnet18-8", *GLYPHS, *args)


def _eval(checkpoint: str, *args: str) -> tuple[str, ...]:
    return ("eval", "--checkpoint", checkpoint, "--image-size", "32", *args)


CASES: dict[str, Case] = {
    # ----------------------------------------------------------------------------- names and model specs
    "unknown architecture": Case(
        _teacher("--model", "resnet51-128"), ("unknown architecture 'resnet51'", "resnet50"), "{out}"
    ),
    "malformed spec resnet50-": Case(
        _teacher("--model", "resnet50-"), ("malformed model spec 'resnet50-'", "ARCH-DIM"), "{out}"
    ),
    "zero embedding dim resnet50-0": Case(
        _teacher("--model", "resnet50-0"), ("resnet50-0", "positive integer"), "{out}"
    ),
    "unknown loss": Case(_teacher("--loss", "triplett"), ("unknown loss 'triplett'", "proxy_anchor"), "{out}"),
    "unknown dataset": Case(_eval("{ckpt}", "--dataset", "imagenet"), ("unknown dataset 'imagenet'", "cars, csv, cub")),
    "unknown recipe": Case(_teacher("--recipe", "pa-cub-vgg"), ("'pa-cub-vgg'", "choose from"), "{out}"),
    "unknown transfer method": Case(
        _transfer("--method", "kd", "--out", "{out}"), ("'kd'", "relaxed_contrastive"), "{out}"
    ),
    "unknown export format": Case(
        ("export", "{ckpt}", "--format", "onnx2", "--out", "{out}"), ("'onnx2'", "onnx", "safetensors"), "{out}"
    ),
    "unknown teacher mode": Case(
        _transfer("--teacher-mode", "replay", "--out", "{out}"), ("'replay'", "online", "cached"), "{out}"
    ),
    "unknown command": Case(("pipeline", "self-transfr"), ("'self-transfr'", "self-transfer")),
    "unknown config key": Case(_teacher("--set", "train.epoch=3"), ("train.epoch", "train.epochs"), "{out}"),
    # ----------------------------------------------------------------------------- data roots and files
    "data root missing": Case(
        _eval("{ckpt}", "--dataset", "cub", "--data-root", "{nowhere}"), ("{nowhere}", "CUB_200_2011")
    ),
    "data root empty": Case(
        _eval("{ckpt}", "--dataset", "cub", "--data-root", "{empty}"), ("{empty}", "extract CUB_200_2011.tgz")
    ),
    "data root wrong layout": Case(
        _eval("{ckpt}", "--dataset", "cub", "--data-root", "{cub_wrong}"),
        ("CUB_200_2011/images", "does not exist"),
    ),
    "fewer images than the official split": Case(
        _eval("{ckpt}", "--dataset", "cub", "--data-root", "{cub_small}"),
        ("expected 5,864 images", "found 4 images", "verify_counts"),
    ),
    "corrupt jpeg": Case(
        _eval("{ckpt}", "--dataset", "folder", "--data-root", "{corrupt_tree}"), ("broken.jpg", "fix or remove")
    ),
    "zero-byte image": Case(
        _eval("{ckpt}", "--dataset", "folder", "--data-root", "{empty_file_tree}"), ("empty.png", "fix or remove")
    ),
    "csv missing columns": Case(
        _eval("{ckpt}", "--dataset", "csv", "--data-root", "{csv_columns}"),
        ("missing column(s) split", "expected path,label,split"),
    ),
    "csv unknown split": Case(
        _eval("{ckpt}", "--dataset", "csv", "--data-root", "{csv_split}"),
        ("unknown split 'validation'", "valid: test, train"),
    ),
    "csv paths that do not exist": Case(
        _eval("{ckpt}", "--dataset", "csv", "--data-root", "{csv_paths}"),
        ("'missing.png'", "paths are relative to"),
    ),
    # ----------------------------------------------------------------------------- checkpoints
    "checkpoint without config.json": Case(
        _eval("{ckpt_no_config}"), ("ckpt_no_config' holds no checkpoint", "expected config.json + model.safetensors")
    ),
    "checkpoint with truncated safetensors": Case(
        _eval("{ckpt_truncated}"), ("model.safetensors", "truncated or modified", "re-download")
    ),
    "checkpoint with tampered safetensors": Case(
        _eval("{ckpt_tampered}"), ("model.safetensors", "does not match the digest")
    ),
    "checkpoint with missing keys": Case(_eval("{ckpt_missing_key}"), ("missing keys embedding.bias",)),
    "checkpoint with unexpected keys": Case(_eval("{ckpt_extra_key}"), ("unexpected keys extra.weight",)),
    "checkpoint with another embedding size": Case(
        _eval("{ckpt_dim}"), ("embedding.bias has shape (8,)", "the model expects (16,)")
    ),
    "checkpoint with corrupt config.json": Case(_eval("{ckpt_bad_json}"), ("config.json", "not valid JSON")),
    "checkpoint folder holding only a pickle": Case(
        _eval("{ckpt_pickle}"), ("ckpt_pickle' holds no checkpoint", "expected config.json + model.safetensors")
    ),
    "teacher architecture does not fit fitnet": Case(
        _transfer("--method", "fitnet", "--out", "{out}", "--batch-size", "16", "--ipc", "4"),
        ("fitnet", "student resnet18 has 4 taps", "teacher googlenet has 3"),
        "{out}",
    ),
    # ----------------------------------------------------------------------------- the Hub
    "hub repository does not exist": Case(
        ("hub", "pull", "dmlkd-test/no-such-model", "--out", "{out}"),
        ("dmlkd-test/no-such-model", "spelling"),
        "{out}",
        env={"online": "1"},
    ),
    "hub revision does not exist": Case(
        ("hub", "pull", f"{HUB_REPO}@no-such-branch", "--out", "{out}"),
        ("revision 'no-such-branch' does not exist", HUB_REPO),
        "{out}",
        env={"online": "1"},
    ),
    "hub without network": Case(
        ("hub", "pull", f"{HUB_REPO}@main", "--out", "{out}"),
        ("no network", "HF_HUB_OFFLINE=1"),
        "{out}",
        env={"online": "down"},
    ),
    "hub reference offline and not cached": Case(
        _eval(f"hf://{HUB_REPO}"), (HUB_REPO, "HF_HUB_OFFLINE"), env={"HF_HUB_OFFLINE": "1"}
    ),
    # ----------------------------------------------------------------------------- training options
    "ipc larger than the batch": Case(
        _teacher("--batch-size", "8", "--ipc", "16"), ("ipc 16 is larger than the batch size 8",), "{out}"
    ),
    "classes per batch above the classes available": Case(
        _teacher("--batch-size", "400", "--ipc", "4"), ("100 classes per batch", "only 8"), "{out}"
    ),
    "negative epochs": Case(_teacher("--epochs", "-1"), ("epochs must be a positive integer", "-1"), "{out}"),
    "zero epochs": Case(_teacher("--epochs", "0"), ("epochs must be a positive integer", "got 0"), "{out}"),
    "zero learning rate": Case(_teacher("--lr", "0"), ("learning rate must be positive", "0.0"), "{out}"),
    "negative learning rate": Case(_teacher("--lr", "-0.1"), ("learning rate must be positive", "-0.1"), "{out}"),
    "zero image size": Case(_teacher("--image-size", "0"), ("image-size must be a positive integer",), "{out}"),
    "negative image size": Case(_teacher("--image-size", "-32"), ("image-size", "-32"), "{out}"),
    "zero save-every": Case(_teacher("--save-every", "0"), ("save-every must be a positive integer",), "{out}"),
    "non-integer epochs": Case(_teacher("--epochs", "ten"), ("'ten' is not a valid integer", "--epochs"), "{out}"),
    "no gpu for --device cuda:7": Case(_eval("{ckpt}", "--device", "cuda:7"), ("cuda:7",)),
    # ----------------------------------------------------------------------------- run folders
    "resume on a folder without a run": Case(
        ("teacher", "train", "--out", "{empty}", "--resume"), ("holds no dmlkd run", "without --resume")
    ),
    "resume a run of the other stage": Case(
        _transfer("--out", "{teacher_run}", "--resume"), ("holds a teacher run", "not a transfer run")
    ),
    "output folder holds a different run": Case(
        _transfer("--out", "{teacher_run}"), ("already holds a teacher run", "--resume", "--overwrite")
    ),
    "output folder holds other files": Case(
        ("teacher", "train", "--out", "{cub_small}", *TEACHER_TINY),
        ("holds no dmlkd run", "empty or new --out"),
    ),
    "unwritable output folder": Case(
        ("teacher", "train", "--out", "{regular_file}/run", *TEACHER_TINY), ("not writable", "Not a directory")
    ),
    "export into an unwritable folder": Case(
        ("export", "{ckpt}", "--format", "safetensors", "--out", "{regular_file}/export"),
        ("regular_file' is a file, not a folder", "writable output folder"),
    ),
}


# --------------------------------------------------------------------------------------------- the world


def _image(path: Path, seed: int, size: int = 48) -> None:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _class_tree(root: Path, bad_name: str | None = None, bad_bytes: bytes = b"") -> Path:
    """``root/<class>/<image>``: 4 classes x 2 images; the last class also holds ``bad_name``."""
    for label in range(4):
        for index in range(2):
            _image(root / f"class{label}" / f"img{index}.png", seed=10 * label + index)
    if bad_name:
        (root / "class3" / bad_name).write_bytes(bad_bytes)
    return root


def _truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    generator = torch.Generator().manual_seed(5)
    pixels = torch.randint(0, 256, (64, 64, 3), generator=generator, dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    return data[: len(data) // 3]


def _rewrite_model_file(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace model.safetensors and record its new digest, as a hand-edited (consistent) checkpoint would."""
    save_file(tensors, str(folder / "model.safetensors"))
    record = json.loads((folder / "config.json").read_text())
    record["files"]["model.safetensors"] = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    (folder / "config.json").write_text(json.dumps(record))


def _checkpoints(fixtures: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    good = save_checkpoint(fixtures / "ckpt", create_model("googlenet-8"))
    paths = {"ckpt": good}

    def variant(name: str) -> Path:
        paths[name] = fixtures / name
        shutil.copytree(good, paths[name])
        return paths[name]

    no_config = variant("ckpt_no_config")
    (no_config / "config.json").unlink()
    truncated = variant("ckpt_truncated") / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    tampered = variant("ckpt_tampered") / "model.safetensors"
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    tensors = load_file(str(good / "model.safetensors"))
    _rewrite_model_file(variant("ckpt_missing_key"), {k: v for k, v in tensors.items() if k != "embedding.bias"})
    _rewrite_model_file(variant("ckpt_extra_key"), {**tensors, "extra.weight": torch.zeros(3)})
    dim = variant("ckpt_dim") / "config.json"
    record = json.loads(dim.read_text())
    record["model"]["embedding_dim"] = 16
    dim.write_text(json.dumps(record))
    (variant("ckpt_bad_json") / "config.json").write_text('{"format": "dmlkd-checkpoint",')
    pickle_only = fixtures / "ckpt_pickle"
    pickle_only.mkdir()
    torch.save(tensors, pickle_only / "pytorch_model.bin")
    paths["ckpt_pickle"] = pickle_only
    return paths


def _data(fixtures: Path) -> dict[str, Path]:
    paths = {"empty": fixtures / "empty", "nowhere": fixtures / "nowhere"}
    paths["empty"].mkdir()
    wrong = fixtures / "cub_wrong" / "CUB_200_2011" / "imgs" / "001.Albatross"
    _image(wrong / "a.png", 1)
    paths["cub_wrong"] = fixtures / "cub_wrong"
    small = fixtures / "cub_small" / "CUB_200_2011" / "images"
    for label in range(2):
        for index in range(2):
            _image(small / f"{label + 1:03d}.Bird{label}" / f"{index}.jpg", 20 + 2 * label + index)
    paths["cub_small"] = fixtures / "cub_small"
    paths["corrupt_tree"] = _class_tree(fixtures / "corrupt_tree", "broken.jpg", _truncated_jpeg())
    paths["empty_file_tree"] = _class_tree(fixtures / "empty_file_tree", "empty.png", b"")
    csv_dir = fixtures / "csv"
    for name in ("a", "b", "c", "d"):
        _image(csv_dir / f"{name}.png", ord(name))
    rows = {
        "csv_columns": "path,label\na.png,0\nb.png,1\n",
        "csv_split": "path,label,split\na.png,0,train\nb.png,1,validation\n",
        "csv_paths": "path,label,split\na.png,0,train\nmissing.png,0,train\nc.png,1,test\nd.png,1,test\n",
    }
    for name, text in rows.items():
        paths[name] = csv_dir / f"{name}.csv"
        paths[name].write_text(text)
    return paths


def _run_folders(fixtures: Path) -> dict[str, Path]:
    """A folder holding a (finished) teacher run as dmlkd writes it, and a regular file to put --out under."""
    run = fixtures / "teacher_run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"stage": "teacher", "status": "finished"}))
    (run / "run_config.json").write_text(json.dumps({"model": {"arch": "resnet18"}}))
    (run / "metrics.jsonl").write_text('{"epoch": 1, "step": 1, "recall@1": 0.5}\n')
    regular = fixtures / "regular_file"
    regular.write_text("not a folder\n")
    return {"teacher_run": run, "regular_file": regular}


# --------------------------------------------------------------------------------------------- a stand-in Hub


@pytest.fixture(scope="module")
def hub_url(module_hub_server: Any) -> str:
    """Knows one repository with one branch and no files: the cases stop at the repository or revision."""
    module_hub_server.repos[HUB_REPO] = {"commit": "0" * 40, "refs": {"main": "0" * 40}, "files": {}}
    return module_hub_server.url


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------- running


def snapshot(*roots: Path) -> dict[str, tuple[Any, ...]]:
    """``path -> (kind, size, mtime_ns, sha256 of small files)`` of everything below ``roots``."""
    entries: dict[str, tuple[Any, ...]] = {}
    for root in roots:
        if not root.exists():
            continue
        for path in [root, *sorted(root.rglob("*"))]:
            info = path.lstat()
            if stat.S_ISDIR(info.st_mode):
                entries[str(path)] = ("dir",)
                continue
            digest = None
            if stat.S_ISREG(info.st_mode) and info.st_size <= SMALL_FILE:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            entries[str(path)] = ("file", info.st_size, info.st_mtime_ns, digest)
    return entries


@dataclass
class Outcome:
    command: list[str]
    returncode: int
    stderr: str
    changed: list[str]
    created: list[str]
    values: dict[str, str]


def _environment(world: Path, case: Case, hub_url: str) -> dict[str, str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(world / "hf-home"),
        "HF_HUB_CACHE": str(world / "hf-cache"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_ETAG_TIMEOUT": "5",
        "HF_HUB_DOWNLOAD_TIMEOUT": "5",
    }
    env.pop("HF_ENDPOINT", None)
    extra = dict(case.env)
    online = extra.pop("online", None)
    if online:
        env["HF_HUB_OFFLINE"] = "0"
        env["HF_ENDPOINT"] = hub_url if online == "1" else f"http://127.0.0.1:{_closed_port()}"
    return {**env, **extra}


def _run_case(name: str, case: Case, world: Path, paths: dict[str, Path], hub_url: str) -> Outcome:
    scratch = world / "cases" / name.replace(" ", "_")
    values = {key: str(value) for key, value in paths.items()} | {"out": str(scratch / "out")}
    command = [sys.executable, "-m", "dmlkd", *(arg.format(**values) for arg in case.args)]
    watched = (world / "fixtures", scratch)
    before = snapshot(*watched)
    result = subprocess.run(
        command, env=_environment(world, case, hub_url), capture_output=True, text=True, timeout=TIMEOUT
    )
    after = snapshot(*watched)
    allowed = case.out.format(**values) if case.out else None
    changed = sorted(path for path, entry in before.items() if after.get(path) != entry)
    created = sorted(
        path
        for path in set(after) - set(before)
        if allowed is None or not (path == allowed or path.startswith(allowed + os.sep))
    )
    return Outcome(command, result.returncode, result.stderr, changed, created, values)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory, hub_url: str) -> dict[str, Outcome]:
    world = tmp_path_factory.mktemp("bad-inputs")
    fixtures = world / "fixtures"
    fixtures.mkdir()
    paths = {**_checkpoints(fixtures), **_data(fixtures), **_run_folders(fixtures)}
    for name in CASES:
        (world / "cases" / name.replace(" ", "_")).mkdir(parents=True)
    initial = snapshot(fixtures)
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = {name: pool.submit(_run_case, name, case, world, paths, hub_url) for name, case in CASES.items()}
        results = {name: future.result() for name, future in futures.items()}
    assert snapshot(fixtures) == initial, "a case modified the shared fixtures"
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_line_and_changes_nothing(name: str, outcomes: dict[str, Outcome]) -> None:
    outcome, case = outcomes[name], CASES[name]
    report = f"{' '.join(outcome.command)}\nexit {outcome.returncode}\n{outcome.stderr}"
    assert outcome.returncode != 0, report
    assert "Traceback" not in outcome.stderr, report
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), report
    for expected in case.expect:
        assert expected.format(**outcome.values) in lines[0], f"{expected!r} missing\n{report}"
    assert not outcome.changed, f"modified: {outcome.changed}\n{report}"
    assert not outcome.created, f"created outside --out: {outcome.created}\n{report}"


def test_catalogue_is_large_enough_and_documented() -> None:
    assert len(CASES) >= 30
    doc = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    for fragment in ("resnet50-", "fitnet", "--resume", "cache", "HF_HUB_OFFLINE", "verify_counts"):
        assert fragment in doc


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dmlkd", "--debug", "teacher", "train", "--out", str(tmp_path), "--lr", "0"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError" in result.stderr


# --------------------------------------------------------------------------------------------- a foreign cache


def _start(args: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "dmlkd", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(process: subprocess.Popen[str]) -> tuple[str, str]:
    stdout, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, stderr
    return stdout, stderr


def test_foreign_teacher_cache_is_rebuilt_not_used(tmp_path: Path) -> None:
    """A cache file at the right name but built for another teacher is detected, logged and rebuilt (exit 0)."""
    teachers = {}
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        teachers[name] = save_checkpoint(tmp_path / f"teacher-{name}", create_model("googlenet-8"))
    options = ["--student", "resnet18-8", *GLYPHS, "--cache-views", "2", "--batch-size", "16", "--ipc", "4"]

    def cache_build(teacher: str, folder: Path) -> subprocess.Popen[str]:
        return _start(
            ["cache", "build", "--teacher", str(teachers[teacher]), *options, "--set", f"teacher.cache_dir={folder}"]
        )

    clean_run, foreign_run = cache_build("b", tmp_path / "clean"), cache_build("a", tmp_path / "foreign")
    clean, foreign = (json.loads(_finish(process)[0]) for process in (clean_run, foreign_run))
    assert clean["teacher_digest"] != foreign["teacher_digest"]
    wanted_name = Path(clean["path"]).name
    planted = {}
    for use in ("cache-build", "transfer"):  # teacher a's cache where teacher b's cache belongs
        planted[use] = tmp_path / f"planted-{use}" / wanted_name
        planted[use].parent.mkdir()
        shutil.copyfile(foreign["path"], planted[use])

    rebuild = cache_build("b", planted["cache-build"].parent)
    transfer = _start(
        [
            "transfer", "train", "--teacher", str(teachers["b"]), *options, "--max-steps", "1",
            "--teacher-mode", "cached", "--out", str(tmp_path / "student"),
            "--set", f"teacher.cache_dir={planted['transfer'].parent}",
            "--set", "eval.nmi=false",
        ]
    )  # fmt: skip
    stdout, stderr = _finish(rebuild)
    rebuilt = json.loads(stdout)
    _, transfer_stderr = _finish(transfer)
    for log in (stderr, transfer_stderr):
        assert "is not usable (it was built for different inputs: teacher_digest" in log, log
        assert "rebuilding it" in log
    assert rebuilt["path"] == str(planted["cache-build"]) and rebuilt["key"] == clean["key"]
    assert rebuilt["teacher_digest"] == clean["teacher_digest"]
    expected = load_file(clean["path"])
    for path in planted.values():
        actual = load_file(str(path))
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[key], actual[key]) for key in expected), "not equal to a clean build"
    assert sorted(path.name for path in planted["transfer"].parent.iterdir()) == [wanted_name]
