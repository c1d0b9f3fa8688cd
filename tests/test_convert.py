"""``dmlkd convert``: the papers' teacher checkpoints (reference key layout) into dmlkd checkpoint folders.

The reference files are made here with the layout seed-spec §4 describes: ``{"model_state_dict": ...}`` with
``model.<torchvision or Caffe-port name>``, ``model.embedding.*`` and the unused ``model.fc.*`` /
``model.last_linear.*``. ResNet files come from torchvision directly, so the key names and the forward pass
(GAP + GMP summed, Linear, L2) are checked against torchvision rather than against dmlkd's own modules.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from click.testing import CliRunner

from dmlkd.checkpoints.card import model_card
from dmlkd.checkpoints.convert import SOURCE_NOTE, convert_reference_checkpoint
from dmlkd.checkpoints.io import load_checkpoint
from dmlkd.cli.app import _Group
from dmlkd.cli.hub import convert_command
from dmlkd.errors import CheckpointError, ConfigError
from dmlkd.models import create_model
from dmlkd.models.spec import CAFFE_BGR, IMAGENET


def _images() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))


def _torchvision_reference(arch: str, dim: int, path: Path) -> torch.nn.Module:
    """A PA/LR-style ResNet teacher: torchvision net (unused fc kept) + ``embedding`` Linear, saved as PA."""
    torch.manual_seed(2)
    net = getattr(torchvision.models, arch)()
    net.embedding = torch.nn.Linear(net.fc.in_features, dim)
    for module in net.modules():  # non-trivial BN statistics so eval-mode outputs test them too
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    state = {f"model.{key}": value for key, value in net.state_dict().items()}
    torch.save({"model_state_dict": state}, path)
    return net.eval()


def _reference_forward(net: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Reference teacher forward: ImageNet normalisation, layer4, GAP + GMP summed, Linear, L2-normalise."""
    mean, std = torch.tensor(IMAGENET.mean).view(1, 3, 1, 1), torch.tensor(IMAGENET.std).view(1, 3, 1, 1)
    x = (images - mean) / std
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
    pooled = x.mean(dim=(2, 3)) + x.amax(dim=(2, 3))
    return F.normalize(net.embedding(pooled), dim=1)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("ref") / "cub_resnet18_16dim_Proxy_Anchor_ckpt.pth"
    return path, _torchvision_reference("resnet18", 16, path)


def test_convert_resnet18_matches_reference_forward(
    resnet18_file: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    path, reference = resnet18_file
    result = convert_reference_checkpoint(path, "resnet18-16", "cub", tmp_path / "teacher")
    assert result.dropped_keys == ("fc.bias", "fc.weight")
    model, record = load_checkpoint(tmp_path / "teacher")
    assert record["model"]["l2_norm"] is True and record["model"]["arch"] == "resnet18"
    assert model.config.resolved_preprocessing() == IMAGENET
    provenance = record["provenance"]
    assert provenance["source"] == SOURCE_NOTE and provenance["dataset"] == "cub"
    assert provenance["source_file"] == path.name
    assert provenance["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() == result.source_sha256
    assert record["metrics"] == {}  # no published numbers for a 16-d ResNet18
    with torch.no_grad():
        ours, theirs = model(_images()).embedding, _reference_forward(reference, _images())
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert torch.allclose(ours.norm(dim=1), torch.ones(2), atol=1e-5)
    assert not any(key.startswith("backbone.fc") for key in model.state_dict())


def test_convert_bn_inception_old_file_with_dataparallel_prefix(tmp_path: Path) -> None:
    # BN-Inception (Caffe port names), saved through nn.DataParallel by a PyTorch without num_batches_tracked.
    torch.manual_seed(3)
    source = create_model("bn_inception-16", l2_norm=True).eval()
    state = {}
    for key, value in source.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            state[f"module.model.{key.removeprefix('backbone.')}"] = value
    state["module.model.last_linear.weight"] = torch.randn(1000, 1024)
    state["module.model.last_linear.bias"] = torch.randn(1000)
    path = tmp_path / "cub_bn_inception_16dim_Proxy_Anchor_ckpt.pth"
    torch.save({"model_state_dict": state}, path)
    result = convert_reference_checkpoint(path, "bn_inception-16", "cub", tmp_path / "teacher")
    assert result.dropped_keys == ("last_linear.bias", "last_linear.weight")
    model, record = load_checkpoint(tmp_path / "teacher")
    assert model.config.resolved_preprocessing() == CAFFE_BGR and record["model"]["l2_norm"] is True
    with torch.no_grad():
        torch.testing.assert_close(model(_images()).embedding, source(_images()).embedding)


WRONG_MODELS = {
    "resnet50-16": "missing keys backbone.layer1.0.conv3.weight.*check --model",  # Bottleneck vs BasicBlock
    "bn_inception-16": "missing keys backbone.conv1_7x7_s2.*unexpected keys backbone.conv1.weight",
    "resnet18-32": "embedding.weight .*shape mismatch|shape mismatch .*embedding.weight",
}


@pytest.mark.parametrize("spec", sorted(WRONG_MODELS))
def test_wrong_model_is_one_line_error(spec: str, resnet18_file: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    path, _ = resnet18_file
    with pytest.raises(CheckpointError, match=WRONG_MODELS[spec]) as caught:
        convert_reference_checkpoint(path, spec, "cub", tmp_path / "out")
    assert path.name in str(caught.value) and spec in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


class _Namespace:  # stands in for a pickled argparse.Namespace or any other non-tensor object
    lr = 1e-4


def test_unsafe_or_foreign_files_are_rejected(tmp_path: Path) -> None:
    pickled = tmp_path / "with_object.pth"
    torch.save({"model_state_dict": {"model.embedding.bias": torch.zeros(2)}, "args": _Namespace()}, pickled)
    with pytest.raises(CheckpointError, match="weights_only"):
        convert_reference_checkpoint(pickled, "resnet18-16", "cub", tmp_path / "a")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"cannot read .*garbage.pth"):
        convert_reference_checkpoint(garbage, "resnet18-16", "cub", tmp_path / "b")
    plain = tmp_path / "torchvision.pth"
    torch.save(torchvision.models.resnet18().state_dict(), plain)  # no model. prefix: not a PA/LR teacher
    with pytest.raises(CheckpointError, match=r"expected keys of the form model.<name>"):
        convert_reference_checkpoint(plain, "resnet18-16", "cub", tmp_path / "c")
    with pytest.raises(CheckpointError, match="does not exist"):
        convert_reference_checkpoint(tmp_path / "absent.pth", "resnet18-16", "cub", tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.pth", "torchvision.pth", "with_object.pth"]


def test_bad_options(resnet18_file: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    path, _ = resnet18_file
    with pytest.raises(ConfigError, match=r"unknown dataset 'birds'; choose from: .*cub"):
        convert_reference_checkpoint(path, "resnet18-16", "birds", tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"already exists.*--overwrite"):
        convert_reference_checkpoint(path, "resnet18-16", "cub", tmp_path / "out")
    convert_reference_checkpoint(path, "resnet18-16", "cub", tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_cli_convert(resnet18_file: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    path, _ = resnet18_file
    group = _Group(commands=[convert_command])
    ok = CliRunner().invoke(
        group,
        ["convert", str(path), "--model", "resnet18-16", "--dataset", "cub", "--out", str(tmp_path / "t")],
    )
    assert ok.exit_code == 0, ok.output
    assert "as resnet18-16" in ok.output and "dropped unused fc.bias, fc.weight" in ok.output
    bad = CliRunner().invoke(
        group,
        [
            "convert",
            str(path),
            "--model",
            "bn_inception-16",
            "--dataset",
            "cub",
            "--out",
            str(tmp_path / "u"),
        ],
    )
    assert bad.exit_code == 2
    lines = bad.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing keys" in lines[0]
    assert not (tmp_path / "u").exists()


def test_convert_resnet50_512_cub_records_paper_numbers(tmp_path: Path) -> None:
    path = tmp_path / "cub_resnet50_512dim_Proxy_Anchor_ckpt.pth"
    reference = _torchvision_reference("resnet50", 512, path)
    convert_reference_checkpoint(path, "resnet50-512", "cub", tmp_path / "teacher")
    model, record = load_checkpoint(tmp_path / "teacher")
    assert record["metrics"]["recall@1"] == pytest.approx(0.699)  # PA README, seed-spec §8.1
    assert record["metrics"]["recall@8"] == pytest.approx(0.914)
    assert "not measured by dmlkd" in record["metrics"]["reported_by"]
    images = _images()[:1, :, :32, :32]
    with torch.no_grad():
        torch.testing.assert_close(model(images).embedding, _reference_forward(reference, images), atol=1e-5, rtol=1e-4)
    card = model_card(json.loads((tmp_path / "teacher" / "config.json").read_text()), "me/cub-r50")
    assert "Reported by Proxy-Anchor README" in card and "| Recall@1 | 69.90 |" in card
