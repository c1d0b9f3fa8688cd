"""Export (safetensors, ONNX, torch.export) behind a parity gate, ``model.embed`` and ``dmlkd embed``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

import dmlkd
from dmlkd.checkpoints.folder import save_checkpoint, sha256_file
from dmlkd.checkpoints.io import load_checkpoint
from dmlkd.cli.inference import embed_command, export_command
from dmlkd.data.transforms import eval_view
from dmlkd.errors import ConfigError, DataError, DmlkdError
from dmlkd.inference import export as export_module
from dmlkd.inference.embed import read_embeddings
from dmlkd.inference.export import export_model
from dmlkd.models import create_model
from dmlkd.models import inputs as model_inputs
from dmlkd.models.inputs import attach_embed_defaults, recorded_image_size

SIZE = 32
FORMATS = ["safetensors", "onnx", "torch.export"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = create_model("resnet18-16").eval()
    directory = tmp_path_factory.mktemp("source") / "ckpt"
    return save_checkpoint(directory, model, train_config={"train": {"image_size": SIZE}})


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> torch.nn.Module:
    return load_checkpoint(checkpoint)[0]


@pytest.fixture(scope="module")
def exports(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``exports[(format, normalize)]``: an export folder made once through the CLI command."""
    root, made = tmp_path_factory.mktemp("exports"), {}

    def get(export_format: str, normalize: bool) -> Path:
        key = (export_format, normalize)
        if key not in made:
            out = root / f"{export_format}-{normalize}"
            args = [str(checkpoint), "--format", export_format, "--out", str(out)]
            result = CliRunner().invoke(export_command, args + (["--normalize"] if normalize else []))
            assert result.exit_code == 0, result.output
            assert "parity: min cosine" in result.output
            made[key] = out
        return made[key]

    return get


def _cli_group():
    from dmlkd.cli.app import _Group

    group = _Group("dmlkd-test")
    group.add_command(export_command)
    group.add_command(embed_command)
    return group


def _images(batch: int, seed: int = 7) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _run_exported(export_format: str, folder: Path, images: torch.Tensor) -> torch.Tensor:
    if export_format == "safetensors":
        return dmlkd.load(str(folder))(images).embedding
    if export_format == "torch.export":
        return torch.export.load(str(folder / "model.pt2")).module()(images)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [node.name for node in session.get_outputs()] == ["embedding"]  # the embedding only
    return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("export_format", FORMATS)
def test_export_parity_and_load_back(exports, model, checkpoint: Path, export_format: str, normalize: bool) -> None:
    folder = exports(export_format, normalize)
    record = json.loads((folder / "export.json").read_text())
    assert record["export_format"] == export_format and record["normalize"] is normalize
    assert record["parity"]["checked"] and record["parity"]["min_cosine"] >= 0.9999
    assert len(record["parity"]["batch_sizes"]) >= 2 and record["parity"]["max_abs_diff"] < 1e-3
    assert record["input"]["shape"] == ["batch", 3, SIZE, SIZE] and record["input"]["preprocessing_baked_in"]
    assert record["output"]["l2_normalized"] is normalize and record["embedding_dim"] == 16
    assert record["source"]["model_digest"] == sha256_file(checkpoint / "model.safetensors")
    assert record["files"][record["artefact"]] == sha256_file(folder / record["artefact"])
    assert record["versions"]["torch"] == torch.__version__
    images = _images(3)  # a batch size the parity check did not use: the batch axis is dynamic
    with torch.no_grad():
        expected = model(images).embedding
        exported = _run_exported(export_format, folder, images)
    if normalize:
        expected = F.normalize(expected, dim=1)
        torch.testing.assert_close(exported.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    else:
        assert (exported.norm(dim=1) - 1).abs().max() > 1e-2  # raw embeddings are not unit vectors
    assert F.cosine_similarity(exported, expected, dim=1).min() >= 0.9999
    torch.testing.assert_close(exported, expected, atol=1e-4, rtol=1e-4)


def test_safetensors_export_is_a_checkpoint_with_the_export_size(exports) -> None:
    folder = exports("safetensors", True)
    loaded, record = load_checkpoint(folder)
    assert loaded.config.l2_norm and recorded_image_size(record) == SIZE
    assert record["provenance"]["export"]["normalize"] is True


def test_parity_failure_leaves_nothing(checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    original = export_module._exported_runner

    def perturbed(export_format: str, folder: Path):
        runner, runtime = original(export_format, folder)
        return (lambda images: runner(images) + torch.randn(images.shape[0], 16)), runtime

    monkeypatch.setattr(export_module, "_exported_runner", perturbed)
    out = tmp_path / "export"
    args = ["export", str(checkpoint), "--format", "safetensors", "--out", str(out)]
    result = CliRunner().invoke(_cli_group(), args)
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert message.startswith("error: export parity failed") and "\n" not in message
    assert not out.exists() and list(tmp_path.iterdir()) == []
    out.mkdir()  # an existing export survives a failed --overwrite
    (out / "keep.txt").write_text("old")
    with pytest.raises(DmlkdError, match="parity failed"):
        export_model(checkpoint, out, "safetensors", overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and len(list(tmp_path.iterdir())) == 1


def test_unknown_format_is_one_line_listing_formats(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        export_model(checkpoint, tmp_path / "out", "tflite")
    message = str(caught.value)
    assert "tflite" in message and all(name in message for name in FORMATS) and "\n" not in message
    result = CliRunner().invoke(_cli_group(), ["export", str(checkpoint), "--format", "tflite", "--out", "x"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "torch.export" in result.stderr
    assert not (tmp_path / "out").exists()


def test_existing_out_is_refused_unless_overwrite(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    result = CliRunner().invoke(export_command, [str(checkpoint), "--format", "safetensors", "--out", str(out)])
    assert isinstance(result.exception, ConfigError) and "--overwrite" in str(result.exception)
    assert (out / "keep.txt").read_text() == "old"
    record = export_model(checkpoint, out, "safetensors", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "export.json", "model.safetensors"]
    assert record["parity"]["checked"]


def test_export_refuses_to_replace_its_source(checkpoint: Path) -> None:
    with pytest.raises(ConfigError, match="source checkpoint"):
        export_model(checkpoint, checkpoint, "safetensors", overwrite=True)
    assert (checkpoint / "model.safetensors").is_file()


def test_image_size_option_and_bad_size(checkpoint: Path, tmp_path: Path) -> None:
    record = export_model(checkpoint, tmp_path / "e", "torch.export", image_size=40)
    assert record["input"]["shape"] == ["batch", 3, 40, 40]
    program = torch.export.load(str(tmp_path / "e" / "model.pt2")).module()
    assert program(torch.rand(2, 3, 40, 40)).shape == (2, 16)
    with pytest.raises(ConfigError, match="image size"):
        export_model(checkpoint, tmp_path / "f", "torch.export", image_size=0)


def test_onnx_parity_is_skipped_without_onnxruntime(exports, monkeypatch) -> None:
    monkeypatch.setattr(export_module, "_onnxruntime_available", lambda: False)
    inputs = export_module.parity_inputs(SIZE)
    parity = export_module._check_parity("onnx", exports("onnx", False), inputs, [x[:, :1] for x in inputs], 0.9999)
    assert parity["checked"] is False and "onnxruntime is not installed" in parity["reason"]


def test_compare_outputs_reports_and_fails() -> None:
    eager = [torch.randn(2, 8), torch.randn(3, 8)]
    result = export_module.compare_outputs(eager, [x + 1e-6 for x in eager])
    assert result["min_cosine"] > 0.9999 and 0 < result["max_abs_diff"] < 1e-5 and result["batch_sizes"] == [2, 3]
    with pytest.raises(DmlkdError, match="min cosine"):
        export_module.compare_outputs(eager, [-x for x in eager])
    with pytest.raises(DmlkdError, match="shape"):
        export_module.compare_outputs(eager, [x[:, :4] for x in eager])


# ---------------------------------------------------------------------------------------------- embedding


def _pil_images() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    shapes = [(40, 52), (37, 29), (32, 32)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]


def test_embed_pil_images_equals_model_on_eval_views(model) -> None:
    images = _pil_images()
    got = model.embed(images, image_size=SIZE)
    views = torch.stack([eval_view(image, SIZE, 256 / 224) for image in images])
    with torch.no_grad():
        expected = model(views).embedding
    assert got.shape == (3, 16) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.embed(images[0], image_size=SIZE), expected[:1], atol=1e-5, rtol=1e-5)
    zoomless = model.embed(images, image_size=SIZE, resize_ratio=1.0, batch_size=2)
    with torch.no_grad():
        expected_zoomless = model(torch.stack([eval_view(image, SIZE, 1.0) for image in images])).embedding
    torch.testing.assert_close(zoomless, expected_zoomless, atol=1e-5, rtol=1e-5)


def test_embed_paths_equals_pil(model, tmp_path: Path) -> None:
    images = _pil_images()
    paths = []
    for number, image in enumerate(images):
        paths.append(tmp_path / f"{number}.png")
        image.convert("L").save(paths[-1]) if number == 1 else image.save(paths[-1])
    expected = model.embed([images[0], images[1].convert("L").convert("RGB"), images[2]], image_size=SIZE)
    torch.testing.assert_close(model.embed(paths, image_size=SIZE, batch_size=2), expected)
    torch.testing.assert_close(model.embed(str(paths[0]), image_size=SIZE), expected[:1])
    with pytest.raises(DataError, match="does not exist"):
        model.embed([tmp_path / "missing.png"], image_size=SIZE)
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(DataError, match=r"bad\.png"):
        model.embed(tmp_path / "bad.png", image_size=SIZE)


def test_embed_tensors_uint8_float_batching_and_normalize(model) -> None:
    as_uint8 = torch.randint(0, 256, (5, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    as_float = as_uint8.float() / 255
    with torch.no_grad():
        expected = model(as_float).embedding
    torch.testing.assert_close(model.embed(as_uint8), expected)
    torch.testing.assert_close(model.embed(as_float, batch_size=2), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.embed(as_float[0]), expected[:1], atol=1e-5, rtol=1e-5)
    normalized = model.embed(as_float, normalize=True)
    torch.testing.assert_close(normalized, F.normalize(expected, dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(normalized.norm(dim=1), torch.ones(5))
    assert model.embed([]).shape == (0, 16)


def test_embed_runs_in_eval_mode_and_restores_training(checkpoint: Path) -> None:
    model = load_checkpoint(checkpoint)[0]
    images = _images(2)
    expected = model.embed(images)
    model.train()
    got = model.embed(images)
    assert model.training and all(module.training for module in model.modules())
    torch.testing.assert_close(got, expected)
    assert not got.requires_grad


def test_embed_rejects_bad_inputs(model) -> None:
    normalised = (_images(2) - 0.45) / 0.225  # ImageNet-normalised input is a common mistake
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        model.embed(normalised)
    with pytest.raises(DataError, match="shape"):
        model.embed(torch.rand(2, 1, SIZE, SIZE))
    with pytest.raises(DataError, match="lists may hold"):
        model.embed([_images(1)[0]])
    with pytest.raises(ConfigError, match="batch size"):
        model.embed(_images(1), batch_size=0)


def test_embed_image_size_defaults_to_the_recorded_one(checkpoint: Path) -> None:
    model, record = load_checkpoint(checkpoint)
    assert recorded_image_size(record) == SIZE
    assert recorded_image_size({"train_config": {"train": {"image_size": None}, "eval": {"image_size": 48}}}) == 48
    assert recorded_image_size({}) is None and model_inputs.default_image_size(model) in (SIZE, 224)
    attach_embed_defaults(model, record)
    image = _pil_images()[0]
    torch.testing.assert_close(model.embed(image), model.embed(image, image_size=SIZE))
    attach_embed_defaults(model, {})
    assert model_inputs.default_image_size(model) == 224


def test_dmlkd_load_of_safetensors_export_embeds(exports, model) -> None:
    loaded = dmlkd.load(str(exports("safetensors", False)))
    images = _pil_images()
    torch.testing.assert_close(loaded.embed(images, image_size=SIZE), model.embed(images, image_size=SIZE))


def test_embed_cli_writes_embeddings_and_paths(checkpoint: Path, model, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    images = _pil_images()
    for name, image in zip(["b.png", "a.jpg", "sub/c.png"], images):
        image.save(folder / name, quality=95)
    out = tmp_path / "emb.safetensors"
    args = [
        str(checkpoint),
        str(folder),
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--normalize",
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(embed_command, args)
    assert result.exit_code == 0, result.output
    assert "wrote 3 embeddings of dimension 16" in result.output
    embeddings, paths, metadata = read_embeddings(out)
    assert paths == [str(folder / "a.jpg"), str(folder / "b.png"), str(folder / "sub" / "c.png")]
    expected = model.embed(paths, image_size=SIZE, normalize=True)  # the checkpoint records 32 px
    torch.testing.assert_close(embeddings, expected, atol=1e-5, rtol=1e-5)
    assert metadata["normalized"] is True and metadata["image_size"] == SIZE and metadata["spec"] == "resnet18-16"
    again = CliRunner().invoke(embed_command, args)
    assert isinstance(again.exception, ConfigError) and "--overwrite" in str(again.exception)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(_cli_group(), ["embed", str(checkpoint), str(empty), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "holds no images" in result.stderr and result.stderr.count("\n") == 1


def test_importing_student_and_its_cli_does_not_import_torch() -> None:
    code = (
        "import sys, dmlkd.inference, dmlkd.cli.inference; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert callable(dmlkd.inference.export_model) and callable(dmlkd.inference.embed_images)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
