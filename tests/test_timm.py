"""timm models as teachers and students: specs, Hub weights offline, taps, checkpoints, export, transfer.

Weights are random (``pretrained=False``) timm models saved in timm's Hub layout (``timm/<name>.<tag>``,
``model.safetensors``) into a pre-populated Hugging Face cache, then loaded with ``pretrained=True`` under
``HF_HUB_OFFLINE=1``: the real ``hf_hub_download`` / timm loading path runs, without network.
"""

from __future__ import annotations

import hashlib
import json
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

timm = pytest.importorskip("timm")  # the `timm` extra; CI installs it through the `test` extra

from dmlkd.checkpoints.folder import save_checkpoint  # noqa: E402
from dmlkd.checkpoints.io import load_checkpoint  # noqa: E402
from dmlkd.cli import main  # noqa: E402
from dmlkd.errors import CheckpointError, ConfigError, ModelSpecError  # noqa: E402
from dmlkd.models import ModelConfig, create_model, parse_spec  # noqa: E402
from dmlkd.models.spec import parse_timm_spec  # noqa: E402
from dmlkd.transfer.base import ModelInfo, TransferContext  # noqa: E402
from dmlkd.transfer.taps import check_tap_fit  # noqa: E402

# The smallest variants timm ships (test_* models exist for timm's own tests): ~0.1-0.6 M parameters.
VIT = "test_vit.r160_in1k"
MOBILENET = "mobilenetv3_small_050.lamb_in1k"
EFFICIENTNET = "test_efficientnet.r160_in1k"
PUBLISHED = (VIT, MOBILENET, EFFICIENTNET)


def _commit(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()


def _publish(cache: Path, name_tag: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Save a random timm model (with its classifier, as published) as ``models--timm--<name_tag>``."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(name_tag, pretrained=False)
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    repo = cache / f"models--timm--{name_tag}"
    snapshot = repo / "snapshots" / _commit(name_tag)
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text(json.dumps({"architecture": name_tag.split(".")[0]}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(_commit(name_tag))  # no trailing newline (offline-testing.md)
    return state


def _published_state(cache: Path, name_tag: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    snapshot = cache / f"models--timm--{name_tag}" / "snapshots" / _commit(name_tag)
    return load_file(str(snapshot / "model.safetensors"))


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("hf-cache")
    for name_tag in PUBLISHED:
        _publish(cache, name_tag)
    return cache


@pytest.fixture(autouse=True)
def offline_cache(monkeypatch: pytest.MonkeyPatch, hub_cache: Path) -> Path:
    """HF_HUB_OFFLINE=1 and the pre-populated cache, for this process (huggingface_hub reads them at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    return hub_cache


def _invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    stderr = result.stderr
    if result.exc_info is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return result.exit_code, result.stdout, stderr


# ------------------------------------------------------------------------------------------------ specs


def test_timm_specs_parse_and_cannot_be_confused_with_arch_dim() -> None:
    spec = parse_spec("timm/vit_small_patch14_dinov2.lvd142m-384")
    assert (spec.arch, spec.dim, spec.revision) == ("timm/vit_small_patch14_dinov2.lvd142m", 384, None)
    pinned = parse_spec("timm/mobilenetv3_large_100@0123abc-128")
    assert (pinned.arch, pinned.dim, pinned.revision) == ("timm/mobilenetv3_large_100", 128, "0123abc")
    assert str(pinned) == "timm/mobilenetv3_large_100@0123abc-128"
    assert parse_spec("timm/resnet18-0").dim == 0  # no head
    assert parse_spec("resnet18-128").arch == "resnet18"  # the built-in torchvision net, not timm's
    assert parse_timm_spec("timm/x.y", default_dim=0).dim == 0
    for bad in ("timm/x", "timm/a-b-3", "timm/-3", "resnet18-0", "timm/x--1"):
        with pytest.raises(ModelSpecError):
            parse_spec(bad)
    with pytest.raises(ModelSpecError, match="embedding_dim must be a positive integer"):
        ModelConfig(arch="resnet18", embedding_dim=0)
    with pytest.raises(ConfigError, match="timm models only"):
        ModelConfig(arch="resnet18", embedding_dim=8, revision="main")


def test_unknown_timm_model_and_tag_are_one_line_errors() -> None:
    with pytest.raises(ModelSpecError, match=r"timm has no model 'mobilenetv3_smal_050'.*mobilenetv3_small_050"):
        create_model("timm/mobilenetv3_smal_050-8")
    with pytest.raises(ModelSpecError, match=r"no pretrained tag 'nope'; choose from: lamb_in1k"):
        create_model("timm/mobilenetv3_small_050.nope-8")


def test_without_timm_installed_the_error_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'dmlkd\[timm\]'"):
        create_model("timm/mobilenetv3_small_050-8")
    code, stdout, _ = _invoke("models")
    assert code == 0 and "timm/NAME[.TAG][@REVISION]-DIM" in stdout


# ------------------------------------------------------------------------ pretrained weights, offline


def test_pretrained_weights_come_from_the_offline_hub_cache(offline_cache: Path) -> None:
    model = create_model("timm/mobilenetv3_small_050-16", pretrained=True)
    # The default tag is resolved and recorded; the weights are the published file's (classifier dropped).
    assert model.config.arch == f"timm/{MOBILENET}"
    expected = {k: v for k, v in _published_state(offline_cache, MOBILENET).items() if not k.startswith("classifier.")}
    got = {k.removeprefix("backbone.model."): v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[key], expected[key]) for key in expected)
    weights = model.backbone.weights
    assert weights["repo_id"] == f"timm/{MOBILENET}" and weights["commit"] == _commit(MOBILENET)
    snapshot = offline_cache / f"models--timm--{MOBILENET}" / "snapshots" / _commit(MOBILENET)
    assert weights["sha256"] == hashlib.sha256((snapshot / "model.safetensors").read_bytes()).hexdigest()


def test_revision_is_pinnable_and_an_unknown_one_is_one_line() -> None:
    model = create_model(f"timm/{MOBILENET}@{_commit(MOBILENET)}-8", pretrained=True)
    assert model.config.revision == _commit(MOBILENET)
    assert model.backbone.weights["commit"] == _commit(MOBILENET)
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE=1 forbids downloading"):
        create_model(f"timm/{MOBILENET}@{'f' * 40}-8", pretrained=True)


def test_missing_weights_offline_are_one_line(offline_cache: Path) -> None:
    with pytest.raises(CheckpointError, match=r"timm/resnet10t\.c3_in1k.*HF_HUB_OFFLINE=1 forbids downloading") as info:
        create_model("timm/resnet10t-8", pretrained=True)
    assert "\n" not in str(info.value)
    code, _, stderr = _invoke("embed", "--help")  # the CLI prints such errors as one `error:` line
    assert code == 0, stderr


def test_only_safetensors_weights_are_read(offline_cache: Path) -> None:
    """A repository that publishes only a pickle is refused (nothing is unpickled from the network)."""
    name = "test_resnet.r160_in1k"
    repo = offline_cache / f"models--timm--{name}"
    snapshot = repo / "snapshots" / _commit(name)
    snapshot.mkdir(parents=True)
    torch.save(timm.create_model(name).state_dict(), snapshot / "pytorch_model.bin")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(_commit(name))
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE=1 forbids downloading"):
        create_model("timm/test_resnet-8", pretrained=True)
    with pytest.raises(CheckpointError, match="safetensors only"):
        create_model("timm/test_resnet-8", weights_path=str(snapshot / "pytorch_model.bin"))


def test_download_from_the_stand_in_hub_then_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub_server: Any
) -> None:
    """The real download path (loopback Hub): model.safetensors only; a pickle-only repo is refused unread."""
    from huggingface_hub import constants
    from safetensors.torch import save

    url = hub_server.url
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    torch.manual_seed(1)
    state = {k: v.contiguous() for k, v in timm.create_model(EFFICIENTNET).state_dict().items()}
    commit = "c" * 40
    hub_server.repos[f"timm/{EFFICIENTNET}"] = {
        "commit": commit,
        "refs": {"main": commit},
        "files": {"model.safetensors": save(state), "pytorch_model.bin": b"not to be read"},
    }
    model = create_model("timm/test_efficientnet-8", pretrained=True)
    assert model.backbone.weights["commit"] == commit
    assert torch.equal(model.backbone.model.conv_stem.weight, state["conv_stem.weight"])
    fetched = [path for method, path in hub_server.requests if method == "GET" and "/resolve/" in path]
    assert fetched and all(path.endswith("model.safetensors") for path in fetched)
    pickle_commit = "d" * 40
    hub_server.repos[f"timm/{VIT}"] = {
        "commit": pickle_commit,
        "refs": {"main": pickle_commit},
        "files": {"pytorch_model.bin": b"a pickle"},
    }
    with pytest.raises(CheckpointError, match=r"has no model.safetensors; dmlkd loads safetensors weights only"):
        create_model(f"timm/{VIT}-0", pretrained=True)
    assert not any(path.endswith("pytorch_model.bin") for _, path in hub_server.requests)
    # Offline afterwards: the cached file is used and the server is not asked.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_server.requests.clear()
    again = create_model("timm/test_efficientnet-8", pretrained=True)
    assert again.backbone.weights == model.backbone.weights and hub_server.requests == []


# ----------------------------------------------------------------------------------- preprocessing, pooling


@pytest.mark.parametrize("name_tag", PUBLISHED)
def test_preprocessing_and_pooling_match_timm(name_tag: str, offline_cache: Path) -> None:
    """dmlkd's model on [0, 1] RGB == timm's own eval transform constants + forward_head(pre_logits=True)."""
    from timm.data import resolve_data_config

    model = create_model(f"timm/{name_tag}-0", pretrained=True).eval()
    reference = timm.create_model(name_tag, pretrained=False, num_classes=0, **model.config.timm_kwargs).eval()
    state = _published_state(offline_cache, name_tag)
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not missing and all(key.startswith(("head.", "classifier.")) for key in unexpected)
    data_config = resolve_data_config(model=reference)
    prep = model.config.preprocessing
    assert prep.mean == tuple(data_config["mean"]) and prep.std == tuple(data_config["std"])
    assert prep.input_size == data_config["input_size"][-1] and prep.interpolation == data_config["interpolation"]
    assert prep.crop_pct == pytest.approx(data_config["crop_pct"])
    images = torch.rand(2, 3, 64, 64)
    normalised = (images - torch.tensor(prep.mean).view(1, 3, 1, 1)) / torch.tensor(prep.std).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(images)
        expected = reference(normalised)  # num_classes=0: timm's pooled pre-logits feature (CLS for the ViT)
    assert model.embedding_dim == model.pooled_dim == expected.shape[1]
    torch.testing.assert_close(out.pooled, expected)
    torch.testing.assert_close(out.embedding, expected)  # DIM 0: no head


def test_vit_embedding_is_the_cls_token() -> None:
    model = create_model(f"timm/{VIT}-0", pretrained=True).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.backbone.model.forward_features(model.preprocess(images))
        out = model(images)
    torch.testing.assert_close(out.pooled, tokens[:, 0])  # global_pool='token': the class token, after the norm


# --------------------------------------------------------------------------------------------- feature taps


def test_cnn_taps_are_stage_maps_at_strides_4_to_32() -> None:
    model = create_model("timm/mobilenetv3_small_050-8").eval()
    with torch.no_grad():
        plain = model(torch.rand(2, 3, 64, 64))
        out = model(torch.rand(2, 3, 64, 64), with_features=True)
    assert plain.features is None
    assert model.tap_strides == (4, 8, 16, 32) and model.tap_kind == "conv"
    assert [tuple(m.shape[1:]) for m in out.features] == [
        (c, 64 // s, 64 // s) for c, s in zip(model.tap_channels, model.tap_strides)
    ]


def test_models_command_describes_a_timm_model() -> None:
    code, stdout, stderr = _invoke("models", "--timm", "mobilenetv3_small_050", "--json")
    assert code == 0, stderr
    row = json.loads(stdout)
    assert row["pretrained_tag"] == "lamb_in1k" and row["tap_strides"] == [4, 8, 16, 32]
    assert row["pooled_dim"] == 1024 and row["tap_kind"] == "conv"


def test_feature_methods_pair_timm_cnns_and_refuse_token_maps() -> None:
    mobilenet = ModelInfo.from_model(create_model("timm/mobilenetv3_small_050-8"))
    efficientnet = ModelInfo.from_model(create_model("timm/test_efficientnet-8"))
    vit = ModelInfo.from_model(create_model("timm/test_vit-0"))
    resnet = ModelInfo(embedding_dim=8, pooled_dim=512, tap_channels=(64, 128, 256, 512), arch="resnet18")
    check_tap_fit("fitnet", mobilenet, efficientnet)  # both tap strides 4, 8, 16, 32
    check_tap_fit("attention", mobilenet, resnet)
    with pytest.raises(ConfigError, match=r"teacher timm/test_vit.*ViT token maps") as info:
        check_tap_fit("fitnet", mobilenet, vit)
    assert "\n" not in str(info.value)


def test_fitnet_step_between_timm_cnns_runs() -> None:
    from dmlkd.data.batch import Batch
    from dmlkd.registry import TRANSFER_METHODS

    student = create_model("timm/mobilenetv3_small_050-8")
    teacher = create_model("timm/test_efficientnet-16").eval()
    method = TRANSFER_METHODS.build(
        "fitnet",
        TransferContext(ModelInfo.from_model(student), ModelInfo.from_model(teacher), 2, 4, 1),
    )
    images = torch.rand(4, 3, 64, 64)
    batch = Batch(images, torch.tensor([0, 0, 1, 1]), torch.arange(4))
    with torch.no_grad():
        teacher_out = teacher(images, with_features=True)
    terms = method(student(images, with_features=True), teacher_out, batch)
    total = sum(terms.values())
    total.backward()
    assert torch.isfinite(total) and "fitnet_stage3" in terms
    assert student.backbone.model.conv_stem.weight.grad is not None


# ------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_records_timm_and_loads_strictly_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = create_model("timm/mobilenetv3_small_050-16", pretrained=True).eval()
    save_checkpoint(tmp_path / "ckpt", model)
    record = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    timm_record = record["provenance"]["timm"]
    assert timm_record["name"] == "mobilenetv3_small_050" and timm_record["pretrained_tag"] == "lamb_in1k"
    assert timm_record["timm_version"] == timm.__version__
    assert timm_record["weights"]["commit"] == _commit(MOBILENET)
    assert record["model"]["preprocessing"]["interpolation"] == "bicubic"  # carried like today's preprocessing

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("loading a checkpoint must not fetch weights")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    loaded, _record = load_checkpoint(tmp_path / "ckpt")
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).embedding, model(images).embedding)
    assert loaded.backbone.weights == timm_record["weights"]  # kept across save -> load -> save
    save_checkpoint(tmp_path / "again", loaded)
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["provenance"]["timm"]["weights"] == timm_record["weights"]
    # Strict: a state dict missing a key is refused with one line naming it.
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    state.pop("embedding.weight")
    save_file(state, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "ckpt")


def test_dmlkd_load_builds_a_published_model_without_a_head() -> None:
    import dmlkd

    model = dmlkd.load(f"timm/{VIT}")
    assert model.config.embedding_dim == 0 and model.config.l2_norm and not model.training
    with torch.no_grad():
        out = model(torch.rand(2, 3, 48, 48))
    torch.testing.assert_close(out.embedding.norm(dim=1), torch.ones(2))
    with pytest.raises(ModelSpecError, match="untrained 128-d embedding head"):
        dmlkd.load(f"timm/{VIT}-128")


def test_vit_input_must_be_a_multiple_of_the_patch_size() -> None:
    model = create_model(f"timm/{VIT}-0")
    with pytest.raises(ConfigError, match=r"16-pixel patches.*got 40x40") as info:
        model(torch.rand(1, 3, 40, 40))
    assert "\n" not in str(info.value)


def test_published_model_embeds_at_its_pretrained_input_size() -> None:
    from dmlkd.models.inputs import default_image_size

    assert default_image_size(load_checkpoint(f"timm/{VIT}")[0]) == 160  # test_vit.r160_in1k: 160 px


def test_zoo_lists_hub_teachers_that_timm_knows() -> None:
    """Every listed name is a registered timm model + tag whose weights live at the same Hub id."""
    from dmlkd.checkpoints.zoo import HUB_TEACHERS
    from dmlkd.models.timm_backbone import pretrained_config

    assert len(HUB_TEACHERS) >= 5
    for teacher in HUB_TEACHERS:
        cfg = pretrained_config(teacher.name)
        assert cfg.hf_hub_id == teacher.name, teacher
        with torch.device("meta"):
            model = timm.create_model(teacher.name.removeprefix("timm/"), num_classes=0)
        assert (getattr(model, "head_hidden_size", None) or model.num_features) == teacher.pooled_dim, teacher
    code, stdout, _ = _invoke("zoo")
    assert code == 0 and HUB_TEACHERS[0].name in stdout


# ----------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("export_format", ["onnx", "torch.export"])
def test_export_of_a_timm_student_passes_the_parity_gate(tmp_path: Path, export_format: str) -> None:
    pytest.importorskip("onnxscript")
    from dmlkd.inference.export import export_model

    model = create_model("timm/mobilenetv3_small_050-16", pretrained=True).eval()
    save_checkpoint(tmp_path / "ckpt", model, train_config={"train": {"image_size": 64}})
    result = export_model(tmp_path / "ckpt", tmp_path / "out", export_format)
    assert result["parity"]["checked"] and result["parity"]["min_cosine"] >= 0.9999
    assert result["model"]["arch"] == f"timm/{MOBILENET}"
    assert result["input"]["shape"] == ["batch", 3, 64, 64]


# ---------------------------------------------------------------------------------------- label-free transfer


def _photos(folder: Path, count: int) -> Path:
    """``count`` random 32 x 32 PNG photos, no labels."""
    from PIL import Image

    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        pixels = (torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"photo{index:02d}.png")
    return folder


def test_label_free_transfer_from_a_timm_vit_teacher_into_a_timm_mobilenet(tmp_path: Path) -> None:
    """dmlkd transfer train --teacher timm/<vit> (published, no head) --student timm/<mobilenet>-16."""
    images = _photos(tmp_path / "photos", 12)
    out = tmp_path / "student"
    code, stdout, stderr = _invoke(
        "transfer", "train", "--teacher", f"timm/{VIT}", "--student", "timm/mobilenetv3_small_050-16",
        "--pretrained", "--dataset", "glyphs", "--set", "data.options.max_classes=8", "--transfer-set", str(images),
        "--max-steps", "2", "--batch-size", "6", "--image-size", "32", "--no-progress", "--set", "eval.nmi=false",
        "--set", "train.eval_at_start=false", "--set", f"teacher.cache_dir={tmp_path / 'cache'}",
        "--set", "teacher.cache_views=1", "--teacher-mode", "cached", "--out", str(out),
    )  # fmt: skip
    assert code == 0, stderr
    assert "teacher mode: cached" in stdout
    record = json.loads((out / "last" / "config.json").read_text())
    assert record["model"]["arch"] == f"timm/{MOBILENET}"
    assert record["provenance"]["timm"]["weights"]["commit"] == _commit(MOBILENET)
    assert record["train_config"]["teacher"]["ref"] == f"timm/{VIT}"
    student = load_checkpoint(out / "last")[0]
    assert student.embedding_dim == 16


def test_commands_taking_a_checkpoint_take_a_published_timm_model(tmp_path: Path) -> None:
    """dmlkd embed timm/<vit> photos/: written once as a checkpoint folder in the dmlkd cache, then used."""
    from dmlkd.checkpoints.io import resolve_checkpoint_dir
    from dmlkd.inference.embed import read_embeddings

    images = _photos(tmp_path / "photos", 3)
    code, _stdout, stderr = _invoke("embed", f"timm/{VIT}", str(images), "--out", str(tmp_path / "e.safetensors"))
    assert code == 0, stderr
    embeddings = read_embeddings(tmp_path / "e.safetensors")
    assert tuple(embeddings[0].shape) == (3, 64)
    folder = resolve_checkpoint_dir(f"timm/{VIT}")
    record = json.loads((folder / "config.json").read_text())
    assert record["provenance"]["source"] == f"timm/{VIT}" and record["model"]["arch"] == f"timm/{VIT}"


def test_pipeline_compress_from_a_published_timm_teacher_skips_stage_1(tmp_path: Path) -> None:
    """dmlkd pipeline compress --src timm/<vit> --dst timm/<mobilenet>-16: no teacher training, label-free."""
    images = _photos(tmp_path / "photos", 12)
    out = tmp_path / "pipeline"
    code, _stdout, stderr = _invoke(
        "pipeline", "compress", "--src", f"timm/{VIT}", "--dst", "timm/mobilenetv3_small_050-16",
        "--dataset", "glyphs", "--set", "data.options.max_classes=8", "--max-steps", "2", "--batch-size", "6",
        "--image-size", "32", "--no-progress", "--out", str(out),
        "--set", f"transfer.transfer_set={images}", "--set", "transfer.train.ipc=null",
        "--set", "transfer.teacher.cache_views=1", "--set", "transfer.eval.nmi=false",
        "--set", f"transfer.teacher.cache_dir={tmp_path / 'cache'}",
    )  # fmt: skip
    assert code == 0, stderr
    teacher = json.loads((out / "teacher" / "config.json").read_text())
    assert teacher["provenance"]["source"] == f"timm/{VIT}" and teacher["model"]["embedding_dim"] == 0
    assert not (out / "teacher" / "run.json").exists()  # used as published, not trained
    student = json.loads((out / "students" / "relaxed_contrastive" / "last" / "config.json").read_text())
    assert student["provenance"]["transfer_set"] == str(images)
    assert student["model"]["arch"] == "timm/mobilenetv3_small_050"  # the demo recipe: no ImageNet weights
    assert (out / "report.md").is_file()


def test_transfer_with_a_bad_timm_teacher_is_one_line(tmp_path: Path) -> None:
    for teacher, message in (
        (f"timm/{VIT}-64", "untrained 64-d embedding head"),
        ("timm/resnet10t", "HF_HUB_OFFLINE=1 forbids downloading"),
        ("timm/not_a_model_at_all", "timm has no model"),
    ):
        code, _, stderr = _invoke(
            "transfer", "train", "--teacher", teacher, "--student", "timm/mobilenetv3_small_050-16",
            "--dataset", "glyphs", "--out", str(tmp_path / "run"), "--no-progress",
        )  # fmt: skip
        assert code == 2, stderr
        assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
        assert not (tmp_path / "run").exists()
