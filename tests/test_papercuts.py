"""Smaller things a new user tripped over (issue 14): hints, lazy subpackages, hub push --dry-run, help texts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import dmlkd
from dmlkd.checkpoints.folder import save_checkpoint
from dmlkd.cli import main
from dmlkd.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dmlkd.models import create_model

    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", create_model("resnet18-8"))


def test_readme_lower_level_pieces_work_after_import_dmlkd() -> None:
    code = (
        "import sys, dmlkd; assert 'torch' not in sys.modules; "
        "model = dmlkd.models.create_model('resnet18-8', l2_norm=True); "
        "assert callable(dmlkd.checkpoints.save_checkpoint) and callable(dmlkd.checkpoints.load_checkpoint); "
        "assert callable(dmlkd.data.catalog.build_splits); "
        "assert callable(dmlkd.teacher.trainer.train_teacher) and callable(dmlkd.transfer.trainer.train_transfer)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="has no attribute 'modles'"):
        dmlkd.modles  # noqa: B018


def test_load_of_org_name_suggests_hf_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"does not exist .*use 'hf://my-org/cub-r50'"):
        dmlkd.load("my-org/cub-r50")
    with pytest.raises(CheckpointError) as caught:
        dmlkd.load(str(tmp_path / "a" / "b" / "c"))
    assert "hf://" not in str(caught.value)


def test_missing_onnx_hint_works_from_a_clone(checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    from dmlkd.inference.export import export_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[export\]'") as caught:
        export_model(checkpoint, tmp_path / "out", "onnx")
    assert "pip install onnx onnxscript onnxruntime" in str(caught.value) and not (tmp_path / "out").exists()


def test_hub_push_dry_run_writes_the_card_and_offline_push_names_hf_hub_offline(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    preview = tmp_path / "preview"
    result = CliRunner().invoke(
        main, ["hub", "push", str(checkpoint), "my-org/tiny", "--dry-run", "--out", str(preview)]
    )
    assert result.exit_code == 0, result.output
    assert "nothing uploaded" in result.stdout
    assert sorted(p.name for p in preview.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert 'dmlkd.load("hf://my-org/tiny")' in (preview / "README.md").read_text()
    again = CliRunner().invoke(
        main, ["hub", "push", str(checkpoint), "my-org/tiny", "--dry-run", "--out", str(preview)]
    )
    assert again.exit_code == 2 and "not empty" in again.stderr
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = CliRunner().invoke(main, ["hub", "push", str(checkpoint), "my-org/tiny"])
    assert offline.exit_code == 2 and offline.stderr.count("\n") == 1, offline.output
    assert "HF_HUB_OFFLINE=1 is set" in offline.stderr and "--dry-run" in offline.stderr


def _help(*command: str) -> str:
    result = CliRunner().invoke(main, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_help_texts() -> None:
    embed = _help("embed")
    assert "1.1428571428571428" not in embed and "256/224" in embed and "--skip-bad-images" in embed
    evaluate = _help("eval")
    assert "[REF]" in evaluate and "means its last/" in evaluate
    datasets = CliRunner().invoke(main, ["datasets"]).stdout
    assert "``" not in datasets
    cub = next(
        row for row in json.loads(CliRunner().invoke(main, ["datasets", "--json"]).stdout) if row["name"] == "cub"
    )
    assert "0-99" not in cub["summary"] and "001-100 train, 101-200 test" in cub["summary"]
    export = _help("export")
    assert "REF" in export and "best/" in export
    assert "--dry-run" in _help("hub", "push")
