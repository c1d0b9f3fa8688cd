"""Backbones, the embedding network, model configs and pretrained-weight loading (CPU, tiny inputs)."""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision.models as tvm
from safetensors.torch import save_file
from torch import Tensor, nn

from dmlkd.config import from_dict, to_dict
from dmlkd.errors import CheckpointError, ConfigError, ModelSpecError
from dmlkd.models import EmbeddingNet, ModelConfig, build_model, create_model
from dmlkd.models.bn_inception import BNInception
from dmlkd.models.pretrained import convert_reference_state_dict
from dmlkd.models.spec import ARCHITECTURES, CAFFE_BGR, IMAGENET, Preprocessing
from dmlkd.registry import BACKBONES

EXPECTED_TAPS = {
    "bn_inception": (576, 1056, 1024),
    "googlenet": (480, 832, 1024),
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}
BN_INCEPTION_FILE = "bn_inception-52deb4733.pth"
RESNET18_FILE = "resnet18-f37072fd.pth"


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ``$TORCH_HOME`` whose hub cache is ``<tmp>/hub``; any download attempt fails like offline."""

    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("network disabled in tests")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    torch.hub.set_dir(str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints


def caffe_layout_state_dict() -> dict[str, Tensor]:
    """A random BN-Inception file in the Caffe port's layout: (1, C) BN tensors, no counters, a classifier."""
    torch.manual_seed(3)
    state = {}
    for key, value in BNInception().state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        if "_bn." in key:
            value = torch.rand_like(value) + 0.5 if key.endswith("running_var") else torch.randn_like(value)
            value = value.unsqueeze(0)
        state[key] = value.clone()
    state["last_linear.weight"] = torch.randn(1000, 1024)
    state["last_linear.bias"] = torch.randn(1000)
    return state


def reference_checkpoint(model: EmbeddingNet, extra_head: str) -> dict[str, dict[str, Tensor]]:
    """The original papers' checkpoint layout: ``model.<name>`` keys plus an unused classifier."""
    state = {}
    for key, value in model.state_dict().items():
        state["model." + key.removeprefix("backbone.")] = value.clone()
    state[f"model.{extra_head}.weight"] = torch.randn(1000, model.pooled_dim)
    state[f"model.{extra_head}.bias"] = torch.randn(1000)
    return {"model_state_dict": state}


# --- architectures ------------------------------------------------------------------------------------


def test_registry_holds_every_architecture() -> None:
    assert set(BACKBONES.names()) == set(ARCHITECTURES)


@pytest.mark.parametrize("arch", BACKBONES.names())
def test_forward_shapes_taps_and_rectified_features(arch: str) -> None:
    torch.manual_seed(0)
    model = create_model(f"{arch}-16").eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64), with_features=True)
    assert model.tap_channels == EXPECTED_TAPS[arch]
    assert model.pooled_dim == EXPECTED_TAPS[arch][-1] == model.backbone.out_channels
    assert out.embedding.shape == (2, 16)
    assert out.pooled.shape == (2, model.pooled_dim)
    assert tuple(f.shape[1] for f in out.features) == EXPECTED_TAPS[arch]
    sizes = [f.shape[-1] for f in out.features]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] == 2  # stride 32 at the last map
    assert all(bool((f >= 0).all()) for f in out.features), "tapped maps must be post-ReLU"
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64)).features is None


@pytest.mark.parametrize(("arch", "sizes"), [("bn_inception", [14, 7, 7]), ("resnet18", [56, 28, 14, 7])])
def test_tap_spatial_sizes_at_224(arch: str, sizes: list[int]) -> None:
    backbone = BACKBONES.build(arch).eval()
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 224, 224))
    assert [m.shape[-1] for m in maps] == sizes


def test_bn_inception_keys_follow_the_caffe_port() -> None:
    state = BNInception().state_dict()
    names = [key for key in state if not key.endswith("num_batches_tracked")]
    assert len(names) == 69 * 6  # 69 conv+BN units, each conv weight/bias and BN weight/bias/mean/var
    assert state["conv1_7x7_s2.weight"].shape == (64, 3, 7, 7)
    assert state["conv1_7x7_s2_bn.running_var"].shape == (64,)
    assert state["inception_3a_pool_proj.weight"].shape == (32, 192, 1, 1)
    assert state["inception_3c_3x3.weight"].shape == (160, 128, 3, 3)
    assert state["inception_4e_double_3x3_2.weight"].shape == (256, 256, 3, 3)
    assert state["inception_5b_pool_proj.weight"].shape == (128, 1024, 1, 1)
    assert "inception_3c_1x1.weight" not in state and "inception_4e_pool_proj.weight" not in state


def test_bn_inception_momentum_is_caffe_port_default_and_configurable() -> None:
    backbone = BNInception()
    norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 69 and all(m.momentum == 0.9 and m.eps == 1e-5 for m in norms)
    x = torch.randn(4, 3, 64, 64)
    backbone.train()(x)[-1].sum().backward()  # in-place ReLUs must not break autograd
    assert backbone.conv1_7x7_s2.weight.grad is not None
    batch_mean = backbone.conv1_7x7_s2(x).mean(dim=(0, 2, 3))
    torch.testing.assert_close(backbone.conv1_7x7_s2_bn.running_mean, 0.9 * batch_mean, rtol=1e-4, atol=1e-5)
    custom = create_model("bn_inception-8", bn_momentum=0.1)
    assert {m.momentum for m in custom.modules() if isinstance(m, nn.BatchNorm2d)} == {0.1}
    resnet = create_model("resnet18-8")
    assert {m.momentum for m in resnet.modules() if isinstance(m, nn.BatchNorm2d)} == {0.1}
    resnet = create_model("resnet18-8", bn_momentum=0.9)
    assert {m.momentum for m in resnet.modules() if isinstance(m, nn.BatchNorm2d)} == {0.9}


# --- embedding network --------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["avg+max", "avg", "max"])
def test_pooling_and_head_match_a_manual_computation(pooling: str) -> None:
    model = create_model("resnet18-8", pooling=pooling).eval()
    with torch.no_grad():
        out = model(torch.rand(3, 3, 64, 64), with_features=True)
    last = out.features[-1]
    average, maximum = last.mean(dim=(2, 3)), last.flatten(2).max(dim=2).values
    expected = {"avg+max": average + maximum, "avg": average, "max": maximum}[pooling]
    torch.testing.assert_close(out.pooled, expected)
    torch.testing.assert_close(out.embedding, out.pooled @ model.embedding.weight.T + model.embedding.bias)


def test_caffe_preprocessing_flips_to_bgr_and_scales_to_255() -> None:
    model = create_model("bn_inception-8")
    image = torch.zeros(1, 3, 2, 2)
    image[0, :, 0, 0] = torch.tensor([1.0, 0.5, 0.0])  # an orange RGB pixel
    pixel = model.preprocess(image)[0, :, 0, 0]
    torch.testing.assert_close(pixel, torch.tensor([0.0 - 104.0, 127.5 - 117.0, 255.0 - 128.0]))


def test_imagenet_preprocessing_and_forward_uses_it() -> None:
    model = create_model("resnet18-8").eval()
    images = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(IMAGENET.mean).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET.std).view(1, 3, 1, 1)
    torch.testing.assert_close(model.preprocess(images), (images - mean) / std)
    seen = []
    model.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model(images)
    torch.testing.assert_close(seen[0], (images - mean) / std)


def test_preprocessing_override_and_non_persistent_buffers() -> None:
    custom = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    model = create_model("googlenet-8", preprocessing=custom)
    torch.testing.assert_close(model.preprocess(torch.ones(1, 3, 2, 2)), torch.ones(1, 3, 2, 2))
    keys = list(model.state_dict())
    assert all(key.startswith(("backbone.", "embedding.")) for key in keys)
    assert {"embedding.weight", "embedding.bias", "backbone.conv1.conv.weight"} <= set(keys)
    assert not any(key.startswith(("backbone.fc.", "backbone.aux")) for key in keys)


def test_l2_norm_option() -> None:
    images = torch.rand(3, 3, 32, 32)
    torch.manual_seed(0)
    normed = create_model("resnet18-8", l2_norm=True).eval()(images).embedding
    torch.testing.assert_close(normed.norm(dim=1), torch.ones(3))
    torch.manual_seed(0)
    raw = create_model("resnet18-8").eval()(images).embedding
    assert not torch.allclose(raw.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(normed, raw / raw.norm(dim=1, keepdim=True))


def test_head_init_orthogonal_and_kaiming() -> None:
    head = create_model("resnet18-16").embedding
    torch.testing.assert_close(head.weight @ head.weight.T, torch.eye(16), atol=1e-5, rtol=0)
    assert bool((head.bias == 0).all())
    torch.manual_seed(0)
    head = create_model("resnet50-256", head_init="kaiming").embedding
    expected_std = (2.0 / 256) ** 0.5  # Kaiming normal, fan_out = embedding dimension
    assert abs(head.weight.std().item() - expected_std) < 0.05 * expected_std
    assert bool((head.bias == 0).all())


# --- ModelConfig --------------------------------------------------------------------------------------


def test_model_config_validation_errors() -> None:
    with pytest.raises(ModelSpecError, match=r"'vgg16'.*bn_inception, googlenet, resnet101"):
        ModelConfig(arch="vgg16", embedding_dim=64)
    with pytest.raises(ModelSpecError, match="embedding_dim"):
        ModelConfig(arch="resnet18", embedding_dim=0)
    with pytest.raises(ModelSpecError, match="resnet50-0"):
        ModelConfig.from_spec("resnet50-0")
    with pytest.raises(ConfigError, match="'colour'"):
        ModelConfig.from_spec("resnet50-512", colour="red")
    with pytest.raises(ConfigError, match="pooling"):
        from_dict(ModelConfig, {"arch": "resnet18", "embedding_dim": 8, "pooling": "sum"})
    with pytest.raises(ConfigError, match="bn_momentum"):
        ModelConfig(arch="resnet18", embedding_dim=8, bn_momentum=1.5)
    with pytest.raises(ConfigError, match="std"):
        ModelConfig(arch="resnet18", embedding_dim=8, preprocessing=Preprocessing((0, 0, 0), (1, 0, 1)))


def test_model_config_from_spec_and_preprocessing() -> None:
    config = ModelConfig.from_spec("bn_inception-512", l2_norm=True)
    assert (config.arch, config.embedding_dim, config.l2_norm) == ("bn_inception", 512, True)
    assert str(config.spec) == "bn_inception-512"
    assert config.resolved_preprocessing() == CAFFE_BGR
    assert ModelConfig.from_spec("resnet18-128").resolved_preprocessing() == IMAGENET
    assert ModelConfig.from_spec("resnet18-128", preprocessing=CAFFE_BGR).resolved_preprocessing() == CAFFE_BGR


@pytest.mark.parametrize("preprocessing", [None, CAFFE_BGR])
def test_model_config_round_trips_through_dicts(preprocessing: Preprocessing | None) -> None:
    config = ModelConfig(
        arch="bn_inception",
        embedding_dim=64,
        l2_norm=True,
        head_init="kaiming",
        pooling="avg",
        weights_path="/tmp/w.pth",
        bn_momentum=0.1,
        preprocessing=preprocessing,
    )
    data = to_dict(config)
    assert from_dict(ModelConfig, data) == config
    assert from_dict(ModelConfig, {"arch": "resnet18", "embedding_dim": 8}) == ModelConfig("resnet18", 8)


# --- pretrained weights -------------------------------------------------------------------------------


def test_resnet18_loads_torchvision_file_from_hub_cache(torch_home: Path) -> None:
    torch.manual_seed(1)
    reference = tvm.resnet18().state_dict()
    torch.save(reference, torch_home / RESNET18_FILE)
    backbone = BACKBONES.build("resnet18", pretrained=True)
    loaded = backbone.state_dict()
    assert set(reference) - set(loaded) == {"fc.weight", "fc.bias"}
    for key, value in loaded.items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)


def test_bn_inception_loads_caffe_layout_file(torch_home: Path) -> None:
    state = caffe_layout_state_dict()
    torch.save(state, torch_home / BN_INCEPTION_FILE)
    model = create_model("bn_inception-32", pretrained=True)
    loaded = model.backbone.state_dict()
    for key, value in state.items():
        if key.startswith("last_linear."):
            assert key not in loaded
            continue
        expected = value.squeeze(0) if value.dim() > 1 and value.shape[0] == 1 else value
        torch.testing.assert_close(loaded[key], expected, rtol=0, atol=0)
    assert {m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {0.9}


@pytest.mark.parametrize(("arch", "file_name"), [("resnet18", RESNET18_FILE), ("bn_inception", BN_INCEPTION_FILE)])
def test_offline_missing_weights_is_a_one_line_error(torch_home: Path, arch: str, file_name: str) -> None:
    with pytest.raises(CheckpointError) as info:
        create_model(f"{arch}-8", pretrained=True)
    message = str(info.value)
    assert "\n" not in message
    assert file_name in message and str(torch_home / file_name) in message
    assert "pretrained=<path>" in message


def test_local_weights_file_safetensors_and_pth(tmp_path: Path) -> None:
    torch.manual_seed(2)
    reference = tvm.resnet18().state_dict()
    save_file({k: v.contiguous() for k, v in reference.items()}, str(tmp_path / "r18.safetensors"))
    torch.save(reference, tmp_path / "r18.pth")
    for name in ("r18.safetensors", "r18.pth"):
        model = build_model(ModelConfig("resnet18", 8, weights_path=str(tmp_path / name)))
        torch.testing.assert_close(model.backbone.conv1.weight, reference["conv1.weight"], rtol=0, atol=0)
        torch.testing.assert_close(model.backbone.layer4[1].bn2.running_var, reference["layer4.1.bn2.running_var"])


def test_unreadable_or_missing_local_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.pth"):
        BACKBONES.build("resnet18", pretrained=str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pth") as info:
        BACKBONES.build("resnet18", pretrained=str(tmp_path / "junk.pth"))
    assert "\n" not in str(info.value)


def test_state_dict_with_missing_unexpected_or_misshaped_key_is_rejected(tmp_path: Path) -> None:
    state = caffe_layout_state_dict()
    missing = {k: v for k, v in state.items() if k != "inception_4a_1x1_bn.running_var"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing keys inception_4a_1x1_bn\.running_var"):
        BACKBONES.build("bn_inception", pretrained=str(tmp_path / "missing.pth"))
    torch.save({**state, "inception_9z_1x1.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys inception_9z_1x1\.weight"):
        BACKBONES.build("bn_inception", pretrained=str(tmp_path / "extra.pth"))
    torch.save({**state, "conv1_7x7_s2.weight": torch.zeros(64, 3, 5, 5)}, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"conv1_7x7_s2\.weight \(64, 3, 5, 5\)"):
        BACKBONES.build("bn_inception", pretrained=str(tmp_path / "shape.pth"))


@pytest.mark.parametrize(("arch", "extra_head"), [("resnet18", "fc"), ("bn_inception", "last_linear")])
def test_reference_state_dict_conversion_round_trip(arch: str, extra_head: str) -> None:
    torch.manual_seed(4)
    source = create_model(f"{arch}-32")
    converted = convert_reference_state_dict(reference_checkpoint(source, extra_head))
    expected = source.state_dict()
    assert set(converted) == set(expected)
    target = create_model(f"{arch}-32")
    target.load_state_dict(converted, strict=True)
    for key, value in target.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    with pytest.raises(CheckpointError, match=r"'embedding\.weight'"):
        convert_reference_state_dict({"embedding.weight": torch.zeros(1)})


# --- zero-init residual (from-scratch ResNets) ----------------------------------------------------------


@pytest.mark.parametrize(("arch", "last_bn"), [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_zero_init_residual_makes_every_block_start_as_identity(arch: str, last_bn: str) -> None:
    torch.manual_seed(0)
    plain = build_model(ModelConfig(arch, 8))
    torch.manual_seed(0)
    zeroed = build_model(ModelConfig(arch, 8, zero_init_residual=True))
    blocks = [block for name in ("layer1", "layer2", "layer3", "layer4") for block in getattr(zeroed.backbone, name)]
    for block in blocks:
        assert torch.count_nonzero(getattr(block, last_bn).weight) == 0
    # The residual branch outputs 0, so a block without a downsample maps its (post-ReLU) input to itself.
    block = zeroed.backbone.layer1[1]
    block.eval()
    block_input = torch.rand(2, block.conv1.in_channels, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(block(block_input), block_input, rtol=0, atol=0)
        assert not torch.equal(plain.backbone.layer1[1].eval()(block_input), block_input)
    # Only those gammas differ: the option draws no extra random numbers, the rest of the init is the same.
    plain_state, zeroed_state = plain.state_dict(), zeroed.state_dict()
    differing = {key for key in plain_state if not torch.equal(plain_state[key], zeroed_state[key])}
    assert differing == {
        f"backbone.{name}.{last_bn}.weight" for name, block in zeroed.backbone.named_modules() if block in blocks
    }


def test_zero_init_residual_leaves_loaded_weights_alone(tmp_path: Path) -> None:
    reference = {k: v for k, v in tvm.resnet18(weights=None).state_dict().items() if not k.startswith("fc.")}
    save_file({k: v.contiguous() for k, v in reference.items()}, str(tmp_path / "r18.safetensors"))
    config = ModelConfig("resnet18", 8, weights_path=str(tmp_path / "r18.safetensors"), zero_init_residual=True)
    model = build_model(config)
    torch.testing.assert_close(model.backbone.layer1[0].bn2.weight, reference["layer1.0.bn2.weight"], rtol=0, atol=0)
    assert torch.count_nonzero(model.backbone.layer1[0].bn2.weight) > 0
    assert from_dict(ModelConfig, to_dict(config)) == config  # recorded with the model, so a rebuild is the same


def test_zero_init_residual_is_for_resnets_only() -> None:
    with pytest.raises(ConfigError, match=r"zero_init_residual.*ResNets only.*bn_inception"):
        ModelConfig("bn_inception", 8, zero_init_residual=True)
