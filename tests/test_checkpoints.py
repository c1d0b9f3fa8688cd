"""Checkpoint folders: atomic writes, bit-exact round trips, strict loading, tamper detection."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import dmlkd
from dmlkd.checkpoints.folder import (
    read_checkpoint_config,
    read_tensors,
    save_checkpoint,
    sha256_file,
    write_folder_atomically,
)
from dmlkd.checkpoints.io import load_checkpoint
from dmlkd.errors import CheckpointError
from dmlkd.models import create_model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("resnet18-16").eval()


def _images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_round_trip_bit_identical(model: torch.nn.Module, tmp_path: Path) -> None:
    proxies = torch.randn(5, 16)
    save_checkpoint(
        tmp_path / "ckpt",
        model,
        extra_tensors={"loss": {"proxies": proxies}},
        metrics={"recall@1": 0.5},
        provenance={"dataset": "glyphs"},
    )
    loaded, record = load_checkpoint(tmp_path / "ckpt")
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert torch.equal(model(_images()).embedding, loaded(_images()).embedding)
    assert record["metrics"]["recall@1"] == 0.5
    assert torch.equal(read_tensors(tmp_path / "ckpt", "loss.safetensors")["proxies"], proxies)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "loss.safetensors",
        "model.safetensors",
    ]


def test_dmlkd_load_accepts_run_folder(model: torch.nn.Module, tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "run" / "last", model)
    loaded = dmlkd.load(str(tmp_path / "run"))
    assert torch.equal(model(_images()).embedding, loaded(_images()).embedding)


def test_no_pickle_in_checkpoint(model: torch.nn.Module, tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "ckpt", model)
    for path in (tmp_path / "ckpt").iterdir():
        assert not path.read_bytes().startswith(b"\x80"), f"{path.name} looks like a pickle"


def test_overwrite_is_atomic_and_failed_write_keeps_old(model: torch.nn.Module, tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    save_checkpoint(target, model, metrics={"v": 1})

    def explode(tmp: Path) -> None:
        (tmp / "partial.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_folder_atomically(target, explode)
    assert read_checkpoint_config(target)["metrics"] == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary leftovers
    load_checkpoint(target)


def test_missing_config(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_checkpoint(tmp_path / "ckpt")


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_truncated_weights(model: torch.nn.Module, tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "ckpt", model)
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or modified"):
        load_checkpoint(tmp_path / "ckpt")


def test_tampered_weights(model: torch.nn.Module, tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "ckpt", model)
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or modified"):
        load_checkpoint(tmp_path / "ckpt")


def _rewrite_weights(folder: Path, state: dict[str, torch.Tensor]) -> None:
    save_file(state, str(folder / "model.safetensors"))
    record = json.loads((folder / "config.json").read_text())
    record["files"]["model.safetensors"] = sha256_file(folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(record))


def test_missing_and_unexpected_keys_are_named(model: torch.nn.Module, tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "ckpt", model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del state["embedding.bias"]
    state["extra.weight"] = torch.zeros(1)
    _rewrite_weights(tmp_path / "ckpt", state)
    with pytest.raises(CheckpointError, match=r"missing keys embedding\.bias; unexpected keys extra\.weight"):
        load_checkpoint(tmp_path / "ckpt")


def test_embedding_dim_mismatch(model: torch.nn.Module, tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "ckpt", model)
    record = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    record["model"]["embedding_dim"] = 32
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"embedding\.(weight|bias) has shape \(16,.*the model expects \(32,"):
        load_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.update(format="something-else"), "not a dmlkd checkpoint config"),
        (lambda r: r.update(format_version=99), "format_version 99"),
        (lambda r: r.update(code="import os"), "unknown keys: code"),
        (lambda r: r["model"].update(arch="vgg16"), "unknown architecture 'vgg16'"),
        (lambda r: r["model"].update(evil="x"), "unknown config key evil"),
        (lambda r: r["files"].update({"../x.safetensors": "0"}), "invalid file entry"),
    ],
)
def test_config_validated_before_tensors(model: torch.nn.Module, tmp_path: Path, edit, message: str) -> None:
    save_checkpoint(tmp_path / "ckpt", model)
    record = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    edit(record)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(record))
    os.remove(tmp_path / "ckpt" / "model.safetensors")  # proves no tensor file is needed to reject the config
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "ckpt")


def test_corrupt_config_json(model: torch.nn.Module, tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "ckpt", model)
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path / "ckpt")
