"""The catalogue of bad input, run through the real ``dmlkd`` CLI as a user meets it (docs/errors.md).

Every case runs ``dmlkd ...`` (through click's CliRunner in this process, or ``python -m dmlkd`` in a subprocess
for the cases that need their own environment) and must exit non-zero with ONE readable stderr line
``error: ...`` that names the bad value and what would be valid (no traceback), and must leave every file that
existed before untouched (path, size, mtime_ns, and sha256 for small files; big tensor files by size and
mtime). New files may appear only under the case's own ``--out``. Subprocess cases run in a small thread pool
(each pays ~3 s of imports); the results are then checked one parametrized test per case.

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
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

from dmlkd.checkpoints.folder import save_checkpoint
from dmlkd.cli import main as cli_main
from dmlkd.models import create_model
from tests import prestarted

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
    # True: click's CliRunner in the test process (no ~3 s of imports per case); False: ``python -m dmlkd`` in a
    # subprocess. Cases with an environment (the stand-in Hub, online/offline) always run in a subprocess.
    inprocess: bool = True

    @property
    def in_this_process(self) -> bool:
        return self.inprocess and not self.env


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


def _quick(args: tuple[str, ...], expect: tuple[str, ...], out: str | None = None) -> Case:
    return Case(args, expect, out, inprocess=True)


def _resume(folder: str) -> tuple[str, ...]:
    return ("teacher", "train", "--out", folder, "--resume", "--no-progress")


def _pull(repo: str) -> Case:
    return Case(("hub", "pull", f"{repo}@main", "--out", "{out}"), (repo,), "{out}", env={"online": "1"})


# Issue 13: integrity, data that is not what it claims, tracebacks, numbers out of range, unclear lines;
# then the cases tried on top of it (marked "own"). docs/errors.md lists them all.
CASES.update(
    {
        # 1-3: integrity of shared checkpoints
        "push a checkpoint whose loss file links outside": Case(
            ("hub", "push", "{ckpt_link}", "dmlkd-test/leak"),
            ("loss.safetensors' is a symbolic link", "replace the link by a copy"),
            env={"online": "1"},
        ),
        "load a checkpoint whose loss file links outside": _quick(
            _eval("{ckpt_link}"), ("loss.safetensors' is a symbolic link",)
        ),
        "pull a repository whose loss file fails its digest": Case(
            ("hub", "pull", "dmlkd-test/bad-loss@main", "--out", "{out}"),
            ("dmlkd-test/bad-loss", "loss.safetensors' does not match the digest"),
            "{out}",
            env={"online": "1"},
        ),
        "tampered loss file in a local checkpoint (own)": _quick(
            _eval("{ckpt_loss_tampered}"), ("loss.safetensors' does not match the digest",)
        ),
        "float16 weights": _quick(_eval("{ckpt_fp16}"), ("has dtype float16", "the model expects float32")),
        "bool weights": _quick(_eval("{ckpt_bool}"), ("has dtype bool", "the model expects float32")),
        "int64 weights": _quick(_eval("{ckpt_int64}"), ("has dtype int64", "the model expects float32")),
        "model.safetensors is a folder (own)": _quick(_eval("{ckpt_dir_file}"), ("is not a regular file",)),
        "digest entry that is not a sha256 (own)": _quick(
            _eval("{ckpt_bad_digest}"), ("invalid file entry 'model.safetensors'", "64-digit hex SHA-256")
        ),
        "NaN in the checkpoint's model config (own)": _quick(
            _eval("{ckpt_nan}"), ("bn_momentum: expected a finite number, got nan",)
        ),
        # 5-6: data that is not what it claims
        "class folder linking back to the root": _quick(
            _eval("{ckpt}", "--dataset", "folder", "--data-root", "{link_tree}"),
            ("loop' is a symbolic link", "remove the link"),
        ),
        "csv with a duplicate row": _quick(
            _eval("{ckpt}", "--dataset", "csv", "--data-root", "{csv_dup_row}"),
            ("'a.png' twice in train", "data.allow_duplicates=true"),
        ),
        "csv with one image in train and test": _quick(
            _eval("{ckpt}", "--dataset", "csv", "--data-root", "{csv_overlap}"),
            ("'c.png' in both train and test", "data.allow_duplicates=true"),
        ),
        "csv with the same bytes under two names": _quick(
            _eval("{ckpt}", "--dataset", "csv", "--data-root", "{csv_same_bytes}"),
            ("'a.png' and 'copy_of_a.png' have the same content", "data.allow_duplicates"),
        ),
        "csv naming one file by two paths (own)": _quick(
            _eval("{ckpt}", "--dataset", "csv", "--data-root", "{csv_two_paths}"),
            ("'a.png' and './a.png' (the same file)",),
        ),
        "csv in latin-1 (own)": _quick(
            _eval("{ckpt}", "--dataset", "csv", "--data-root", "{csv_latin1}"),
            ("line 2: byte 0xe9 is not UTF-8 text", "save the file as UTF-8"),
        ),
        "csv separated by semicolons (own)": _quick(
            _eval("{ckpt}", "--dataset", "csv", "--data-root", "{csv_semicolon}"),
            ("missing column(s)", "separated by commas, not ';'"),
        ),
        "csv holding a NUL byte (own)": _quick(
            _eval("{ckpt}", "--dataset", "csv", "--data-root", "{csv_nul}"), ("line 4: holds a NUL character",)
        ),
        "utf-16 csv with a duplicate row (own)": _quick(
            _eval("{ckpt}", "--dataset", "csv", "--data-root", "{csv_utf16_dup}"), ("'b.png' twice in train",)
        ),
        # 7-8: tracebacks (the full disk is test_full_disk_*, below)
        "error inside a DataLoader worker": Case(
            _eval("{ckpt}", "--dataset", "folder", "--data-root", "{corrupt_tree}", "--set", "eval.num_workers=1"),
            ("cannot read image", "broken.jpg", "fix or remove the file"),
        ),
        # 9: resume states
        "resume with a progress key missing": _quick(
            _resume("{resume_missing_key}"), ("progress.json'", "key progress.global_step is missing", "--overwrite")
        ),
        "resume with an extra progress key": _quick(
            _resume("{resume_extra_key}"), ("progress.json'", "key progress.bonus is unknown")
        ),
        "resume without the RNG tensor": _quick(
            _resume("{resume_no_rng}"), ("tensors.safetensors'", "tensor 'rng.torch' is missing")
        ),
        "resume with corrupt progress.json": _quick(
            _resume("{resume_bad_progress}"), ("progress.json' is not valid JSON",)
        ),
        "resume with corrupt run_config.json": _quick(
            _resume("{resume_bad_config}"), ("run_config.json' is not valid JSON",)
        ),
        "resume with an unknown key in run_config.json (own)": _quick(
            _resume("{resume_config_key}"), ("run_config.json' is not a valid teacher config", "train.epoch")
        ),
        "resume with a text epoch (own)": _quick(
            _resume("{resume_text_epoch}"), ("key progress.epoch is '3', expected int",)
        ),
        "resume with a negative step (own)": _quick(
            _resume("{resume_negative}"), ("key progress.global_step is -5", "count >= 0")
        ),
        "resume with run_config.json holding a list (own)": _quick(
            _resume("{resume_config_list}"), ("holds list, expected a JSON object",)
        ),
        # 10: nesting and sizes
        "deeply nested config.json": _quick(_eval("{ckpt_deep}"), ("config.json' is nested 100,000", "at most 64")),
        "embedding size of 10^12 in a spec": _quick(
            _teacher("--model", "resnet18-1000000000000"), ("'resnet18-1000000000000'", "GiB of memory"), "{out}"
        ),
        "embedding size of 10^12 in a checkpoint": _quick(
            _eval("{ckpt_huge}"), ("model googlenet-1000000000000", "smaller embedding dimension")
        ),
        "deeply nested resume state (own)": _quick(_resume("{resume_deep}"), ("nested", "at most 64")),
        # 11: Hub repositories listing unsafe names
        "hub repository listing ../": _pull("dmlkd-test/dotdot"),
        "hub repository listing an absolute path": _pull("dmlkd-test/absolute"),
        "hub repository listing a NUL byte": _pull("dmlkd-test/nul"),
        # 12: input too small
        "googlenet at 7 pixels": _quick(
            _teacher("--model", "googlenet-8", "--image-size", "7"),
            ("googlenet needs images of at least 15x15",),
            "{out}",
        ),
        "bn_inception at 16 pixels": _quick(
            _teacher("--model", "bn_inception-8", "--image-size", "16"),
            ("bn_inception needs images of at least 31",),
            "{out}",
        ),
        "bn_inception at 48 pixels (own)": _quick(
            _eval("{ckpt_bn}", "--image-size", "48"), ("bn_inception cannot embed 48x48", "31-38 or 224")
        ),
        # 13: numbers out of range
        "seed beyond 64 bits": _quick(
            _teacher("--seed", str(2**70)), ("seed must be an integer in [0, 2**63)",), "{out}"
        ),
        "NaN weight decay": _quick(
            _teacher("--set", "optim.weight_decay=NaN"), ("optim.weight_decay", "finite"), "{out}"
        ),
        "negative momentum": _quick(
            _teacher("--set", "optim.momentum=-1"), ("optim.momentum must lie in [0, 1)",), "{out}"
        ),
        "infinite learning rate": _quick(_teacher("--lr", "inf"), ("optim.lr", "finite number", "inf"), "{out}"),
        "NaN gradient clip": _quick(
            _teacher("--set", "optim.clip_grad_value=NaN"), ("optim.clip_grad_value", "finite"), "{out}"
        ),
        "embed with a NaN resize ratio": _quick(
            ("embed", "{ckpt}", "{csv_dir}", "--out", "{out}", "--resize-ratio", "nan"),
            ("resize ratio must be a number from 1", "nan"),
        ),
        "embed into an existing folder": _quick(
            ("embed", "{ckpt}", "{csv_dir}", "--out", "{empty}", "--overwrite"), ("is a folder", ".safetensors file")
        ),
        "float where an integer belongs (own)": _quick(
            _eval("{ckpt}", "--set", "eval.batch_size=1.5"), ("eval.batch_size: expected an integer, got 1.5",)
        ),
        "epochs of 1e400 (own)": _quick(_teacher("--set", "train.epochs=1e400"), ("train.epochs", "inf"), "{out}"),
        "number where a string belongs (own)": _quick(
            _eval("{ckpt}", "--set", "data.root=5"), ("data.root: expected a string, got 5",)
        ),
        "value where a section belongs (own)": _quick(_teacher("--set", "train=3"), ("train", "section"), "{out}"),
        "text where a flag belongs (own)": _quick(
            _eval("{ckpt}", "--set", "data.allow_duplicates=yes"), ("data.allow_duplicates", "true or false")
        ),
        "infinite eval resize via a huge ratio (own)": _quick(
            ("embed", "{ckpt}", "{csv_dir}", "--out", "{out}", "--resize-ratio", "1e9"), ("from 1 (no zoom-in) to 8",)
        ),
        # 14: unclear lines
        "malicious pickle given to convert": _quick(
            ("convert", "{evil_pth}", "--model", "resnet50-512", "--dataset", "cub", "--out", "{out}"),
            ("would call posix.system", "never runs pickled code"),
        ),
        "empty .pth given to convert": _quick(
            ("convert", "{empty_pth}", "--model", "resnet50-512", "--dataset", "cub", "--out", "{out}"),
            ("is empty (0 bytes)", "download"),
        ),
        "truncated .pth given to convert (own)": _quick(
            ("convert", "{truncated_pth}", "--model", "resnet50-512", "--dataset", "cub", "--out", "{out}"),
            ("truncated_pth.pth", "torch.save"),
        ),
    }
)


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
    for name, dtype in (("ckpt_fp16", torch.float16), ("ckpt_bool", torch.bool), ("ckpt_int64", torch.int64)):
        _rewrite_model_file(variant(name), {**tensors, "embedding.weight": tensors["embedding.weight"].to(dtype)})
    model_file = variant("ckpt_dir_file") / "model.safetensors"
    model_file.unlink()
    model_file.mkdir()
    _edit_config(variant("ckpt_bad_digest"), lambda record: record["files"].update({"model.safetensors": "x" * 64}))
    _edit_config(variant("ckpt_nan"), lambda record: record["model"].update({"bn_momentum": float("nan")}))
    _edit_config(variant("ckpt_huge"), lambda record: record["model"].update({"embedding_dim": 10**12}))
    (variant("ckpt_deep") / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    # a checkpoint with a loss file, and one whose loss file is a link to a secret outside the folder
    loss = save_checkpoint(
        fixtures / "ckpt_loss", create_model("googlenet-8"), extra_tensors={"loss": {"p": torch.ones(2)}}
    )
    secret = fixtures / "secret.safetensors"
    save_file({"token": torch.tensor([1.0, 2.0])}, str(secret))
    linked = fixtures / "ckpt_link"
    shutil.copytree(loss, linked)
    (linked / "loss.safetensors").unlink()
    (linked / "loss.safetensors").symlink_to(secret)
    _edit_config(linked, lambda record: record["files"].update({"loss.safetensors": _sha256(secret)}))
    tampered_loss = fixtures / "ckpt_loss_tampered"
    shutil.copytree(loss, tampered_loss)
    save_file({"p": torch.zeros(2)}, str(tampered_loss / "loss.safetensors"))
    torch.manual_seed(0)
    bn = save_checkpoint(fixtures / "ckpt_bn", create_model("bn_inception-8"))
    paths.update(ckpt_link=linked, ckpt_loss_tampered=tampered_loss, ckpt_bn=bn, ckpt_loss=loss)
    return paths


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _edit_config(folder: Path, edit: Any) -> None:
    record = json.loads((folder / "config.json").read_text())
    edit(record)
    (folder / "config.json").write_text(json.dumps(record))


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned-by-pickle",))


def _reference_files(fixtures: Path) -> dict[str, Path]:
    paths = {name: fixtures / f"{name}.pth" for name in ("evil_pth", "empty_pth", "truncated_pth")}
    torch.save({"model_state_dict": _Evil()}, paths["evil_pth"])
    paths["empty_pth"].write_bytes(b"")
    torch.save({"model_state_dict": {"model.fc.weight": torch.zeros(4, 4)}}, paths["truncated_pth"])
    paths["truncated_pth"].write_bytes(paths["truncated_pth"].read_bytes()[:100])
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
    shutil.copyfile(csv_dir / "a.png", csv_dir / "copy_of_a.png")
    good = "path,label,split\na.png,0,train\nb.png,0,train\nc.png,1,test\nd.png,1,test\n"
    rows.update(
        csv_dup_row=good + "a.png,0,train\n",
        csv_overlap=good + "c.png,0,train\n",
        csv_same_bytes="path,label,split\na.png,0,train\nb.png,0,train\ncopy_of_a.png,1,test\nd.png,1,test\n",
        csv_two_paths=good + "./a.png,0,train\n",
        csv_semicolon=good.replace(",", ";"),
        csv_nul=good.replace("c.png", "c\x00.png"),
    )
    for name, text in rows.items():
        paths[name] = csv_dir / f"{name}.csv"
        paths[name].write_text(text)
    paths["csv_latin1"] = csv_dir / "csv_latin1.csv"
    paths["csv_latin1"].write_bytes(good.replace("a.png", "caf\u00e9.png").encode("latin-1"))
    paths["csv_utf16_dup"] = csv_dir / "csv_utf16_dup.csv"
    paths["csv_utf16_dup"].write_text(good + "b.png,0,train\n", encoding="utf-16")
    paths["csv_dir"] = csv_dir
    link_tree = _class_tree(fixtures / "link_tree")
    (link_tree / "loop").symlink_to(".")
    paths["link_tree"] = link_tree
    return paths


def _resume_states(fixtures: Path) -> dict[str, Path]:
    """A one-step teacher run with a saved state, and copies with a damaged state or config."""
    run = fixtures / "resume_good"
    args = ["teacher", "train", "--out", str(run), *TEACHER_TINY, "--save-every", "1", "--set", "eval.nmi=false"]
    args += ["--set", "train.keep_state=true"]  # a finished run keeps its state only when asked
    result = CliRunner().invoke(cli_main, args)
    assert result.exit_code == 0, result.output
    assert (run / "state" / "progress.json").is_file()
    paths = {}

    def variant(name: str, edit: Any, file: str = "state/progress.json") -> None:
        paths[name] = fixtures / name
        shutil.copytree(run, paths[name], symlinks=True)
        target = paths[name] / file
        edited = edit(json.loads(target.read_text()))  # a new record, or raw text
        target.write_text(edited if isinstance(edited, str) else json.dumps(edited))

    def drop(record: dict[str, Any]) -> dict[str, Any]:
        del record["progress"]["global_step"]
        return record

    def extra(record: dict[str, Any]) -> dict[str, Any]:
        record["progress"]["bonus"] = 1
        return record

    def text_epoch(record: dict[str, Any]) -> dict[str, Any]:
        record["progress"]["epoch"] = "3"
        return record

    def negative(record: dict[str, Any]) -> dict[str, Any]:
        record["progress"]["global_step"] = -5
        return record

    def config_key(record: dict[str, Any]) -> dict[str, Any]:
        record["train"]["epoch"] = 3
        return record

    variant("resume_missing_key", drop)
    variant("resume_extra_key", extra)
    variant("resume_text_epoch", text_epoch)
    variant("resume_negative", negative)
    variant("resume_bad_progress", lambda record: '{"progress": {"epoch": 0,')
    variant("resume_deep", lambda record: "[" * 5000 + "]" * 5000)
    variant("resume_bad_config", lambda record: "{not json", "run_config.json")
    variant("resume_config_key", config_key, "run_config.json")
    variant("resume_config_list", lambda record: [record], "run_config.json")
    paths["resume_no_rng"] = fixtures / "resume_no_rng"
    shutil.copytree(run, paths["resume_no_rng"])
    state = paths["resume_no_rng"] / "state"
    tensors = {k: v for k, v in load_file(str(state / "tensors.safetensors")).items() if k != "rng.torch"}
    save_file(tensors, str(state / "tensors.safetensors"))
    record = json.loads((state / "progress.json").read_text())
    record["digest"] = _sha256(state / "tensors.safetensors")
    (state / "progress.json").write_text(json.dumps(record))
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


def _hub_repos(server: Any, paths: dict[str, Path]) -> None:
    """Repositories built from the fixtures' checkpoint with a loss file: one damaged, three with unsafe names."""
    folder = paths["ckpt_loss"]
    files = {name: (folder / name).read_bytes() for name in ("config.json", "model.safetensors", "loss.safetensors")}
    repos = {
        "dmlkd-test/bad-loss": {**files, "loss.safetensors": b"not a safetensors file"},
        "dmlkd-test/dotdot": {**files, "../evil.safetensors": b"x"},
        "dmlkd-test/absolute": {**files, "/tmp/evil.safetensors": b"x"},
        "dmlkd-test/nul": {**files, "evil\x00.safetensors": b"x"},
    }
    for number, (repo, repo_files) in enumerate(repos.items(), start=1):
        commit = f"{number:040d}"
        server.repos[repo] = {"commit": commit, "refs": {"main": commit}, "files": repo_files}


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


def _folder_name(name: str) -> str:
    return "".join(char if char.isalnum() or char in "-_" else "_" for char in name)


def _run_case(name: str, case: Case, world: Path, paths: dict[str, Path], hub_url: str) -> Outcome:
    scratch = world / "cases" / _folder_name(name)
    values = {key: str(value) for key, value in paths.items()} | {"out": str(scratch / "out")}
    command = [sys.executable, "-m", "dmlkd", *(arg.format(**values) for arg in case.args)]
    watched = (world / "fixtures", scratch)
    before = snapshot(*watched)
    if case.in_this_process:
        returncode, stderr = _invoke(command[3:])
    else:
        result = prestarted.run(
            command, env=_environment(world, case, hub_url), capture_output=True, text=True, timeout=TIMEOUT
        )
        returncode, stderr = result.returncode, result.stderr
    after = snapshot(*watched)
    allowed = case.out.format(**values) if case.out else None
    changed = sorted(path for path, entry in before.items() if after.get(path) != entry)
    created = sorted(
        path
        for path in set(after) - set(before)
        if allowed is None or not (path == allowed or path.startswith(allowed + os.sep))
    )
    return Outcome(command, returncode, stderr, changed, created, values)


def _invoke(args: list[str]) -> tuple[int, str]:
    """Run ``dmlkd ARGS`` through click's CliRunner; an exception that escapes counts as a traceback."""
    result = CliRunner().invoke(cli_main, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        trace = "".join(traceback.format_exception(result.exception))
        return 1, f"{result.stderr}Traceback (in process):\n{trace}"
    return result.exit_code, result.stderr


def _selected_cases(request: pytest.FixtureRequest) -> dict[str, Case]:
    """The cases of the tests pytest will run: all, unless ``-k`` or node ids narrow the selection."""
    names = set()
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "name" in callspec.params:
            names.add(callspec.params["name"])
    return {name: case for name, case in CASES.items() if name in names}


@pytest.fixture(scope="module")
def outcomes(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, hub_url: str, module_hub_server: Any
) -> dict[str, Outcome]:
    chosen = _selected_cases(request)
    world = tmp_path_factory.mktemp("bad-inputs")
    fixtures = world / "fixtures"
    fixtures.mkdir()
    paths = {**_checkpoints(fixtures), **_data(fixtures), **_run_folders(fixtures), **_reference_files(fixtures)}
    paths.update(_resume_states(fixtures))
    _hub_repos(module_hub_server, paths)
    for name in chosen:
        (world / "cases" / _folder_name(name)).mkdir(parents=True)
    initial = snapshot(fixtures)
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = {
            name: pool.submit(_run_case, name, case, world, paths, hub_url)
            for name, case in chosen.items()
            if not case.in_this_process
        }
        local = {name: case for name, case in chosen.items() if case.in_this_process}  # meanwhile, in this process
        results = {name: _run_case(name, case, world, paths, hub_url) for name, case in local.items()}
        results.update({name: future.result() for name, future in futures.items()})
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
    assert len(CASES) >= 30 + 50
    assert sum(name.endswith("(own)") for name in CASES) >= 20
    doc = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    fragments = ("resnet50-", "fitnet", "--resume", "cache", "HF_HUB_OFFLINE", "verify_counts", "symbolic link")
    fragments += ("data.allow_duplicates=true", "finite number", "progress.json", "at most 64", "posix.system")
    for fragment in fragments:
        assert fragment in doc, fragment


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dmlkd", "--debug", "teacher", "train", "--out", str(tmp_path), "--lr", "0"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError" in result.stderr


# --------------------------------------------------------------------------------------------- a foreign cache


def _start(args: list[str]) -> prestarted.Process:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return prestarted.popen(
        [sys.executable, "-m", "dmlkd", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(process: prestarted.Process) -> tuple[str, str]:
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

    def cache_build(teacher: str, folder: Path) -> prestarted.Process:
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


# --------------------------------------------------------------------------------------------- a real full disk


@pytest.fixture
def small_mount(tmp_path: Path) -> Any:
    """``mount(size, read_only=False)`` -> a fresh tmpfs folder; skipped where this machine cannot mount one."""
    mounted: list[Path] = []

    def mount(size: str, read_only: bool = False) -> Path:
        folder = tmp_path / f"mount{len(mounted)}"
        folder.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {result.stderr.decode().strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", str(folder)], capture_output=True)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``dmlkd ARGS`` in this process (CliRunner); an escaping exception is reported as a traceback."""
    returncode, stderr = _invoke(list(args))
    return subprocess.CompletedProcess(list(args), returncode, "", stderr)


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_full_disk_during_a_real_export_is_one_line_and_keeps_the_previous_one(
    tmp_path: Path, small_mount: Any
) -> None:
    """Point 7 on a real 40 MB tmpfs: the first export (~23 MB) fits, replacing it does not."""
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "ckpt", create_model("googlenet-8"))
    disk = small_mount("40m")
    first = _cli("export", str(checkpoint), "--format", "safetensors", "--out", str(disk / "export"))
    assert first.returncode == 0, first.stderr
    before = snapshot(disk)
    second = _cli("export", str(checkpoint), "--format", "safetensors", "--out", str(disk / "export"), "--overwrite")
    line = _one_error_line(second)
    assert "no space left on device" in line and "free some space" in line
    assert snapshot(disk) == before, "the previous export changed or a temporary folder was left behind"


def test_full_disk_during_a_teacher_state_write_is_one_line(small_mount: Any) -> None:
    """The state/checkpoint writes of a run on a tmpfs too small for them: one line, no traceback."""
    disk = small_mount("30m")
    result = _cli("teacher", "train", "--out", str(disk / "run"), *TEACHER_TINY, "--save-every", "1")
    line = _one_error_line(result)
    assert "no space left on device" in line and str(disk) in line


def test_read_only_cache_dir_is_refused_before_the_cache_is_computed(tmp_path: Path, small_mount: Any) -> None:
    torch.manual_seed(0)
    teacher = save_checkpoint(tmp_path / "teacher", create_model("googlenet-8"))
    read_only = small_mount("1m", read_only=True)
    result = _cli(
        "cache", "build", "--teacher", str(teacher), "--student", "resnet18-8", *GLYPHS, "--cache-views", "2",
        "--batch-size", "16", "--ipc", "4", "--set", f"teacher.cache_dir={read_only}",
    )  # fmt: skip
    line = _one_error_line(result)
    assert f"teacher cache folder {str(read_only)!r} is not writable" in line and "teacher.cache_dir" in line
    assert "--out" not in line
    assert "building teacher cache" not in result.stderr.lower()


# --------------------------------------------------------------------------------------------- image modes


def _tiff_rgb16(pixels: Any) -> bytes:
    """An uncompressed little-endian RGB TIFF with 16 bits per sample (PIL cannot write one)."""
    import struct

    height, width, _ = pixels.shape
    data = pixels.astype("<u2").tobytes()
    entries = [(256, 3, 1, width), (257, 3, 1, height), (258, 3, 3, 0), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, 1, 0), (277, 3, 1, 3), (278, 3, 1, height), (279, 4, 1, len(data)), (284, 3, 1, 1)]  # fmt: skip
    bits_at = 8 + 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries)))
    for tag, kind, count, value in entries:
        value = {258: bits_at, 273: bits_at + 6}.get(tag, value)
        out += (
            struct.pack("<HHIHH", tag, kind, count, value, 0)
            if kind == 3 and count == 1
            else struct.pack("<HHII", tag, kind, count, value)
        )
    return bytes(out + struct.pack("<I", 0) + struct.pack("<HHH", 16, 16, 16) + data)


def _mode_images(folder: Path) -> list[tuple[Path, Path]]:
    """Pairs (image in an unusual mode, the 8-bit RGB image it should arrive as)."""
    import numpy as np

    generator = np.random.default_rng(3)
    gray16 = generator.integers(0, 65536, (40, 40), dtype=np.uint16)
    gray8 = np.rint(gray16 / 257).astype(np.uint8)
    rgb16 = generator.integers(0, 65536, (40, 40, 3), dtype=np.uint16)
    alpha = np.where(generator.random((40, 40)) < 0.5, 0, 255).astype(np.uint8)
    level = generator.integers(0, 256, (40, 40), dtype=np.uint8)
    composited = np.where(alpha == 0, 255, level).astype(np.uint8)
    palette = Image.fromarray((level // 64).astype(np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    palette.info["transparency"] = 0
    palette_rgb = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)[level // 64]
    palette_rgb[level // 64 == 0] = 255
    cases = {
        "i16.png": (Image.fromarray(gray16), np.stack([gray8] * 3, -1)),
        "i32.tif": (Image.fromarray(gray16.astype(np.int32)), np.stack([gray8] * 3, -1)),
        "f32.tif": (Image.fromarray(gray16.astype(np.float32) / 65535), np.stack([gray8] * 3, -1)),
        "la.png": (Image.fromarray(np.stack([level, alpha], -1), mode="LA"), np.stack([composited] * 3, -1)),
        "p_transparent.png": (palette, palette_rgb),
        "cmyk.tif": (Image.fromarray(np.stack([255 - level, level, level, level * 0], -1), mode="CMYK"), None),
        "rgb16.tif": (None, (rgb16 >> 8).astype(np.uint8)),
    }
    pairs = []
    for name, (image, expected) in cases.items():
        path = folder / "modes" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if image is None:
            path.write_bytes(_tiff_rgb16(rgb16))
        else:
            image.save(path)
        if expected is None:
            expected = np.asarray(image.convert("RGB"))
        reference = folder / "references" / f"{path.stem}.png"
        reference.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(expected).save(reference)
        pairs.append((path, reference))
    return pairs


def test_every_image_mode_arrives_as_its_8bit_rgb_image(tmp_path: Path) -> None:
    """Point 4 through `dmlkd embed`: each unusual mode embeds like its 8-bit RGB reference (16-bit PNG, I, F, LA,
    P with transparency, CMYK, 16-bit RGB TIFF); before the fix a 16-bit PNG arrived 99 % white."""
    from dmlkd.inference.embed import read_embeddings

    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "ckpt", create_model("resnet18-16"))
    pairs = _mode_images(tmp_path)
    out = tmp_path / "embeddings.safetensors"
    arguments = [str(checkpoint), str(tmp_path / "modes"), str(tmp_path / "references"), "--image-size", "32"]
    result = CliRunner().invoke(cli_main, ["embed", *arguments, "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    embeddings, paths, _ = read_embeddings(out)
    row = {Path(path).resolve(): index for index, path in enumerate(paths)}
    for image, reference in pairs:
        got, want = embeddings[row[image.resolve()]], embeddings[row[reference.resolve()]]
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-3), f"{image.name} differs from its 8-bit RGB image"


def test_duplicates_are_accepted_knowingly_and_utf16_csv_is_read(tmp_path: Path) -> None:
    """``data.allow_duplicates=true`` evaluates the CSV the duplicate check refuses; a UTF-16 CSV is read."""
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "ckpt", create_model("resnet18-8"))
    for name in "abcd":
        _image(tmp_path / f"{name}.png", ord(name))
    table = tmp_path / "list.csv"
    table.write_text(
        "path,label,split\na.png,0,train\nb.png,0,train\nc.png,1,test\nd.png,1,test\nc.png,1,test\n", encoding="utf-16"
    )
    base = [
        "eval",
        "--checkpoint",
        str(checkpoint),
        "--dataset",
        "csv",
        "--data-root",
        str(table),
        "--image-size",
        "32",
    ]
    refused = CliRunner().invoke(cli_main, base)
    assert refused.exit_code == 2 and "'c.png' twice in test" in refused.stderr
    accepted = CliRunner().invoke(cli_main, [*base, "--set", "data.allow_duplicates=true", "--json"])
    assert accepted.exit_code == 0, accepted.output
    assert "recall@1" in accepted.stdout
