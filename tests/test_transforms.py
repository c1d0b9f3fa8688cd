"""Replayable views: torchvision parity, key-determinism, replay, collation, loaders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

from dmlkd.data.base import ArrayImageCollection
from dmlkd.data.batch import Batch
from dmlkd.data.loading import make_eval_loader, make_train_loader
from dmlkd.data.samplers import ClassBalancedBatchSampler
from dmlkd.data.transforms import (
    EvalDataset,
    ReplaySpec,
    TrainDataset,
    ViewParams,
    apply_view,
    collate_views,
    eval_view,
    replay_keys,
    replay_view_params,
    sample_view_params,
    view_generator,
)
from dmlkd.errors import ConfigError


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture
def collection() -> ArrayImageCollection:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (12, 20, 24), dtype=np.uint8)  # grayscale, non-square
    return ArrayImageCollection(images, [f"img{i}" for i in range(12)], np.repeat(np.arange(4), 3))


@pytest.mark.parametrize("flip", [False, True])
def test_apply_view_matches_torchvision(flip: bool):
    image = _image(37, 29)
    generator = torch.Generator().manual_seed(5)
    for _ in range(8):
        params = sample_view_params(generator, 37, 29, scale=(0.1, 1.0))
        params = ViewParams(params.top, params.left, params.height, params.width, flip)
        expected = F.resized_crop(
            image,
            params.top,
            params.left,
            params.height,
            params.width,
            [16, 16],
            T.InterpolationMode.BILINEAR,
        )
        expected = F.to_tensor(F.hflip(expected) if flip else expected)
        actual = apply_view(image, params, 16)
        assert actual.shape == (3, 16, 16) and actual.dtype == torch.float32
        assert torch.equal(actual, expected)


def test_apply_view_converts_grayscale_to_rgb():
    gray = Image.fromarray(np.arange(100, dtype=np.uint8).reshape(10, 10))
    view = apply_view(gray, ViewParams(0, 0, 10, 10, False), 10)
    assert view.shape == (3, 10, 10)
    assert torch.equal(view[0], view[1]) and torch.equal(view[0] * 255, torch.arange(100.0).reshape(10, 10))


@pytest.mark.parametrize(("width", "height", "size"), [(50, 40, 32), (40, 61, 24), (30, 30, 30)])
def test_eval_view_matches_reference_test_transform(width: int, height: int, size: int):
    image = _image(width, height, seed=1)
    reference = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), T.ToTensor()])
    assert torch.equal(eval_view(image, size), reference(image))
    no_zoom = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor()])
    assert torch.equal(eval_view(image, size, resize_ratio=1.0), no_zoom(image))
    assert torch.equal(eval_view(image, size, resize_ratio=None), no_zoom(image))


def test_eval_view_rejects_shrinking_ratio():
    with pytest.raises(ConfigError, match=r"ratio 0\.5"):
        eval_view(_image(8, 8), 8, resize_ratio=0.5)


@pytest.mark.parametrize("seed", [0, 1, 17, 123])
def test_sample_view_params_replays_torchvision_draws(seed: int):
    image = _image(64, 40)
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        expected_box = T.RandomResizedCrop.get_params(image, list(scale), list(ratio))
        expected_flip = bool(torch.rand(1) < 0.5)
    params = sample_view_params(torch.Generator().manual_seed(seed), 64, 40, scale, ratio)
    assert (params.top, params.left, params.height, params.width) == expected_box
    assert params.flip == expected_flip


def test_sample_view_params_respects_bounds():
    generator = torch.Generator().manual_seed(0)
    width, height, scale, ratio = 48, 32, (0.2, 0.6), (0.5, 2.0)
    flips = 0
    for _ in range(500):
        p = sample_view_params(generator, width, height, scale, ratio)
        assert 0 <= p.top and p.top + p.height <= height and 0 <= p.left and p.left + p.width <= width
        # rounding the sides to pixels moves area and aspect a little
        assert scale[0] * 0.85 <= p.width * p.height / (width * height) <= scale[1] * 1.15
        assert ratio[0] * 0.85 <= p.width / p.height <= ratio[1] * 1.15
        flips += p.flip
    assert 200 < flips < 300
    assert not any(sample_view_params(generator, 10, 10, flip_p=0.0).flip for _ in range(50))


def test_sample_view_params_falls_back_to_central_crop():
    # A 100x10 strip cannot hold a near-full-area crop with aspect <= 4/3: every try fails.
    params = sample_view_params(torch.Generator().manual_seed(0), 100, 10, scale=(0.9, 1.0))
    assert (params.height, params.width) == (10, round(10 * 4 / 3))
    assert params.top == 0 and params.left == (100 - params.width) // 2
    assert sample_view_params(torch.Generator(), 30, 30, scale=(1.0, 1.0), ratio=(2.0, 3.0)).width == 30


def test_view_generator_is_a_pure_function_of_keys():
    def draw(*keys: int) -> torch.Tensor:
        return torch.rand(4, generator=view_generator(*keys))

    assert torch.equal(draw(0, 5, 1), draw(0, 5, 1))
    assert len({tuple(draw(*keys).tolist()) for keys in [(0, 5, 1), (0, 5, 0), (0, 6, 1), (1, 5, 1)]}) == 4


def test_train_views_depend_only_on_seed_draw_view(collection):
    dataset = TrainDataset(collection, 16, views=2, seed=7, scale=(0.3, 1.0))
    views, label, index, replay_k = dataset[(4, 1000)]
    assert views.shape == (2, 3, 16, 16) and (label, index) == (1, 4)
    assert replay_k.tolist() == [-1, -1]
    assert not torch.equal(views[0], views[1])
    again = TrainDataset(collection, 16, views=2, seed=7, scale=(0.3, 1.0))[(4, 1000)][0]
    assert torch.equal(views, again)
    assert not torch.equal(views, dataset[(4, 1001)][0])
    assert not torch.equal(views, TrainDataset(collection, 16, views=2, seed=8, scale=(0.3, 1.0))[(4, 1000)][0])
    params = sample_view_params(view_generator(7, 1000, 1), 24, 20, (0.3, 1.0))
    assert views.dtype == torch.uint8  # converted to float on the model's device (x / 255, as ToTensor)
    assert torch.equal(views[1].float().div(255), apply_view(collection.load(4), params, 16))


def test_replayed_views_equal_direct_apply_of_stored_params(collection):
    replay = ReplaySpec(num_sets=3, seed=11)
    dataset = TrainDataset(collection, 12, views=2, seed=2, replay=replay)
    keys = [(i, 50 + i) for i in range(len(collection))] + [(5, draw) for draw in range(40)]
    seen = set()
    for index, draw in keys:
        views, _, _, replay_k = dataset[(index, draw)]
        for view, k in enumerate(replay_k.tolist()):
            assert 0 <= k < 3
            seen.add(k)
            stored = replay_view_params(replay, index, k, 24, 20)
            assert torch.equal(views[view].float().div(255), apply_view(collection.load(index), stored, 12))
    assert seen == {0, 1, 2}
    batch_keys = keys[:4]
    expected = [(i, int(dataset[(i, d)][3][v])) for v in range(2) for i, d in batch_keys]
    assert replay_keys(batch_keys, 2, 2, replay) == expected


def test_collate_views_is_view_major(collection):
    dataset = TrainDataset(collection, 8, views=3, replay=ReplaySpec(4, 0))
    items = [dataset[(i, 10 * i)] for i in (0, 5, 9, 11)]
    batch, replay_k = collate_views(items)
    assert isinstance(batch, Batch) and batch.images.shape == (12, 3, 8, 8)
    for v in range(3):
        for i, item in enumerate(items):
            assert torch.equal(batch.images[i + v * 4], item[0][v])
            assert batch.labels[i + v * 4] == item[1] and batch.indices[i + v * 4] == item[2]
            assert replay_k[i + v * 4] == item[3][v]
    assert batch.indices.tolist() == [0, 5, 9, 11] * 3


def test_eval_dataset_and_loader_keep_order(collection):
    dataset = EvalDataset(collection, 16)
    image, label, index = dataset[7]
    assert image.shape == (3, 16, 16) and (label, index) == (2, 7)
    batches = list(make_eval_loader(collection, 16, batch_size=5))
    assert [len(batch.indices) for batch in batches] == [5, 5, 2]
    assert torch.cat([batch.indices for batch in batches]).tolist() == list(range(12))
    assert torch.equal(batches[1].images[2], dataset[7][0])


def test_train_loader_is_independent_of_worker_count(collection):
    def run(workers: int) -> list[tuple[Batch, torch.Tensor]]:
        sampler = ClassBalancedBatchSampler(collection.labels, 4, 2, seed=1)
        loader = make_train_loader(TrainDataset(collection, 8, views=2, seed=3), sampler, num_workers=workers)
        batches = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            batches.extend(loader)
        return batches

    serial, parallel = run(0), run(2)
    assert len(serial) == len(parallel) == 2 * 3
    for (a, ka), (b, kb) in zip(serial, parallel):
        assert a.images.shape == (8, 3, 8, 8)
        assert torch.equal(a.images, b.images) and torch.equal(a.indices, b.indices) and torch.equal(ka, kb)
    assert not torch.equal(serial[0][0].images, serial[3][0].images)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_size": 0},
        {"views": 0},
        {"seed": -1},
        {"scale": (0.5, 0.2)},
        {"ratio": (0.0, 1.0)},
        {"flip_p": 2.0},
    ],
)
def test_train_dataset_rejects_bad_settings(collection, kwargs: dict):
    settings = {"image_size": 8} | kwargs
    with pytest.raises(ConfigError) as error:
        TrainDataset(collection, **settings)
    assert "\n" not in str(error.value)


def test_replay_spec_validation():
    with pytest.raises(ConfigError, match="num_sets=0"):
        ReplaySpec(0, 1)
    assert math.isclose(ReplaySpec(2, 0).num_sets, 2)


def test_views_of_one_draw_replay_distinct_sets() -> None:
    from dmlkd.data.transforms import replay_choice

    for draw in range(200):
        chosen = [replay_choice(3, draw, view, 8) for view in range(4)]
        assert len(set(chosen)) == 4 and all(0 <= k < 8 for k in chosen)
    assert {replay_choice(3, draw, 0, 8) for draw in range(200)} == set(range(8))  # every set gets used
    assert [replay_choice(3, 7, view, 2) for view in range(4)][:2] != [replay_choice(3, 7, 0, 2)] * 2
