"""The reduced training data path: JPEG decode at reduced size, exact crop mapping, uint8 views, device-side
conversion, and the baseline path kept selectable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dmlkd.data import decode as decode_module
from dmlkd.data.base import ArrayImageCollection, FileImageCollection
from dmlkd.data.transforms import (
    TrainDataset,
    ViewParams,
    apply_view,
    collate_views,
    render_views,
    view_reduction,
)
from dmlkd.engine.memory_format import use_channels_last
from dmlkd.errors import DataError
from dmlkd.models import create_model


def _smooth_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Photo-like content (smooth colour fields plus mild noise) so interpolation differences stay small."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    fields = [np.sin(xs / s + ys / (1.7 * s) + p) for s, p in zip(rng.uniform(12, 40, 3), rng.uniform(0, 6, 3))]
    noisy = 127.5 * (np.stack(fields, axis=-1) + 1) + rng.normal(0, 4, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def jpeg_collection(tmp_path_factory) -> FileImageCollection:
    folder = tmp_path_factory.mktemp("jpegs")
    names = []
    for index, (width, height) in enumerate([(500, 375), (403, 467), (375, 500)]):
        Image.fromarray(_smooth_image(width, height, index)).save(folder / f"{index}.jpg", quality=95)
        names.append(f"{index}.jpg")
    Image.fromarray(_smooth_image(60, 50)).save(folder / "3.png")
    names.append("3.png")
    return FileImageCollection(folder, names, [0, 0, 1, 1])


def test_view_reduction_keeps_the_crop_at_least_the_output_size():
    def params(width: int, height: int) -> ViewParams:
        return ViewParams(0, 0, height, width, False)

    assert view_reduction(params(447, 500), 224) == 1  # shorter side below 2 x 224: full decode
    assert view_reduction(params(448, 460), 224) == 2
    assert view_reduction(params(900, 1000), 224) == 4
    assert view_reduction(params(5000, 4000), 224) == 8  # JPEG DCT scaling stops at 1/8
    assert view_reduction(params(64, 64), 16) == 4 and view_reduction(params(64, 64), 8) == 8


@pytest.mark.parametrize("use_simplejpeg", [True, False])
def test_reduced_decode_sizes_and_crops_match_the_full_decode(jpeg_collection, monkeypatch, use_simplejpeg):
    if use_simplejpeg and decode_module.simplejpeg is None:
        pytest.skip("simplejpeg is not installed (dmlkd[fastjpeg])")
    if not use_simplejpeg:
        monkeypatch.setattr(decode_module, "simplejpeg", None)  # Pillow's draft mode
    source = jpeg_collection.open(0)
    full = jpeg_collection.load(0)
    assert source.size == full.size == (500, 375)
    for scale in (2, 4, 8):
        image, actual = source.decode(scale)
        assert actual == scale and image.size == (-(-500 // scale), -(-375 // scale))
    size = 40
    crops = [ViewParams(13, 21, 330, 410, False), ViewParams(100, 200, 170, 250, True), ViewParams(5, 7, 90, 80, False)]
    assert [view_reduction(p, size) for p in crops] == [8, 4, 2]
    views = render_views(source, crops, size).float()
    assert views.shape == (3, 3, size, size)
    for view, params in zip(views, crops):
        expected = apply_view(full, params, size) * 255
        error = (view - expected).abs().mean()
        # Within interpolation tolerance: a crop box one pixel off already differs by more on this image.
        shifted = ViewParams(params.top + 3, params.left + 3, params.height, params.width, params.flip)
        assert error < 2.0 < (apply_view(full, shifted, size) * 255 - expected).abs().mean()


def test_full_scale_views_and_non_jpeg_files_equal_the_baseline(jpeg_collection):
    # 200 px views of crops below 400 px: every view decodes at full size.
    baseline = TrainDataset(jpeg_collection, 200, views=2, seed=3, scale=(0.2, 0.6))
    baseline.data_path = "baseline"
    reduced = TrainDataset(jpeg_collection, 200, views=2, seed=3, scale=(0.2, 0.6))
    for index in range(len(jpeg_collection)):
        old, new = baseline[(index, 9)], reduced[(index, 9)]
        assert old[0].dtype == torch.float32 and new[0].dtype == torch.uint8
        difference = (new[0].float() - old[0] * 255).abs()
        if index == 3:  # PNG: no reduced decode, identical pixels
            assert difference.max() == 0
        else:  # JPEG: same crops; the two libjpeg-turbo builds may round a few pixels differently
            assert difference.mean() < 0.5
        assert old[1:3] == new[1:3] and torch.equal(old[3], new[3])


def test_corrupt_jpeg_is_a_data_error_naming_the_file(tmp_path):
    path = tmp_path / "bad.jpg"
    Image.fromarray(_smooth_image(40, 30)).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:200])
    collection = FileImageCollection(tmp_path, ["bad.jpg", "missing.jpg"], [0, 0])
    with pytest.raises(DataError, match=r"bad\.jpg"):
        collection.open(0).decode(1)
    with pytest.raises(DataError, match="does not exist"):
        collection.open(1)


def test_uint8_batches_are_channels_last_and_the_model_converts_them_exactly():
    images = np.random.default_rng(0).integers(0, 256, (4, 20, 24, 3), dtype=np.uint8)
    collection = ArrayImageCollection(images, [str(i) for i in range(4)], [0, 0, 1, 1])
    dataset = TrainDataset(collection, 16, views=2, seed=1, scale=(0.3, 1.0))
    batch, _ = collate_views([dataset[(i, 5 + i)] for i in range(4)])
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (8, 3, 16, 16)
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    # 4x fewer bytes per view than float32 leave the worker.
    assert batch.images.element_size() * 4 == torch.empty(0).element_size() * 1
    torch.manual_seed(0)
    model = create_model("resnet18-8").eval()
    with torch.no_grad():
        from_uint8 = model(batch.images).embedding
        from_float = model(batch.images.float().div(255).contiguous()).embedding
    assert torch.equal(from_uint8, from_float)


def test_channels_last_only_for_mixed_precision_on_cuda():
    model = create_model("resnet18-8")
    assert not use_channels_last(model, "bf16", torch.device("cpu"))
    assert not use_channels_last(model, "no", torch.device("cuda"))
    assert model.input_memory_format == torch.contiguous_format
    assert next(model.parameters()).is_contiguous()


@pytest.mark.parametrize("data_path", ["reduced", "baseline"])
def test_train_data_path_is_a_config_field_and_the_cpu_loader_is_not_pinned(data_path):
    from dmlkd.config import TrainConfig
    from dmlkd.data.base import DatasetSplits
    from dmlkd.data.training import build_train_data

    images = np.random.default_rng(0).integers(0, 256, (8, 20, 24, 3), dtype=np.uint8)
    collection = ArrayImageCollection(images, [str(i) for i in range(8)], [0, 0, 1, 1, 2, 2, 3, 3])
    splits = DatasetSplits(name="tiny", train=collection, test=collection)
    train = TrainConfig(batch_size=4, ipc=2, image_size=8, data_path=data_path, device="cpu")
    data = build_train_data(splits, train)
    assert data.dataset.data_path == data_path
    loader = data.loader_factory(0, 0)
    assert loader.pin_memory is False
    batch, _ = next(iter(loader))
    assert batch.images.dtype == (torch.uint8 if data_path == "reduced" else torch.float32)
