"""Global-batch samplers: class balance, coverage, reproducibility, resume, rank slicing, errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from dmlkd.data.samplers import ClassBalancedBatchSampler, RandomBatchSampler
from dmlkd.errors import ConfigError

# 10 classes of uneven size, one smaller than K, one much larger than the rest.
LABELS = np.concatenate([np.full(n, c) for c, n in enumerate([5, 6, 7, 8, 1, 9, 4, 20, 6, 6])])
np.random.default_rng(0).shuffle(LABELS)


def _epoch(sampler, epoch: int = 0, start_batch: int = 0) -> list[list[tuple[int, int]]]:
    sampler.set_epoch(epoch, start_batch)
    return list(sampler)


def _indices(batch: list[tuple[int, int]]) -> list[int]:
    return [index for index, _ in batch]


@pytest.mark.parametrize("mode", ["reference", "cover"])
def test_every_batch_is_p_distinct_classes_times_k(mode: str):
    sampler = ClassBalancedBatchSampler(LABELS, 12, 3, seed=1, mode=mode)
    batches = _epoch(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        labels = LABELS[_indices(batch)].reshape(4, 3)  # grouped by class
        assert (labels == labels[:, :1]).all()
        assert len(set(labels[:, 0])) == 4


def test_reference_epoch_length_and_replacement():
    sampler = ClassBalancedBatchSampler(LABELS, 12, 3, seed=0)
    assert len(sampler) == len(LABELS) // 12
    counts = Counter(i for epoch in range(30) for batch in _epoch(sampler, epoch) for i in _indices(batch))
    # class 4 has one image: drawing K=3 with replacement repeats it inside a batch
    lonely = int(np.flatnonzero(LABELS == 4)[0])
    assert counts[lonely] % 3 == 0 and counts[lonely] > 0
    assert len(counts) == len(LABELS)  # over many epochs every image shows up


def test_cover_mode_visits_every_image_each_epoch():
    sampler = ClassBalancedBatchSampler(LABELS, 12, 3, seed=4, mode="cover")
    groups = sum(-(-n // 3) for n in np.bincount(LABELS))
    assert len(sampler) == max(-(-groups // 4), -(-20 // 3))
    for epoch in range(3):
        seen = Counter(i for batch in _epoch(sampler, epoch) for i in _indices(batch))
        assert set(seen) == set(range(len(LABELS)))
        repeats = sum(seen.values()) - len(LABELS)
        assert repeats == len(sampler) * 12 - len(LABELS)
        assert repeats <= 2 * 10 + (len(sampler) * 4 - groups) * 3  # top-ups + filler groups


def test_cover_mode_is_exact_when_everything_divides():
    labels = np.repeat(np.arange(6), 4)  # 6 classes x 4 images, K=2 -> 12 groups, P=3 -> 4 batches
    sampler = ClassBalancedBatchSampler(labels, 6, 2, seed=9, mode="cover")
    assert len(sampler) == 4
    drawn = sorted(i for batch in _epoch(sampler, 2) for i in _indices(batch))
    assert drawn == list(range(24))


def test_cover_mode_with_a_dominant_class():
    labels = np.array([0] * 30 + [1, 1, 2, 2, 3, 3])  # class 0 alone needs 15 batches at K=2
    sampler = ClassBalancedBatchSampler(labels, 4, 2, mode="cover")
    assert len(sampler) == 15
    batches = _epoch(sampler)
    assert set(i for batch in batches for i in _indices(batch)) == set(range(len(labels)))
    assert all(len(set(labels[_indices(batch)])) == 2 for batch in batches)


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: ClassBalancedBatchSampler(LABELS, 12, 3, **kw),
        lambda **kw: ClassBalancedBatchSampler(LABELS, 12, 3, mode="cover", **kw),
        lambda **kw: RandomBatchSampler(len(LABELS), 12, **kw),
    ],
)
def test_reproducible_and_epochs_differ(make):
    first, second = make(seed=3), make(seed=3)
    assert _epoch(first, 2) == _epoch(second, 2)
    assert _epoch(first, 2) == _epoch(make(seed=3), 2)  # from (seed, epoch) alone, no history
    assert [_indices(b) for b in _epoch(first, 0)] != [_indices(b) for b in _epoch(first, 1)]
    assert [_indices(b) for b in _epoch(first, 0)] != [_indices(b) for b in _epoch(make(seed=4), 0)]


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: ClassBalancedBatchSampler(LABELS, 12, 3, **kw),
        lambda **kw: ClassBalancedBatchSampler(LABELS, 12, 3, mode="cover", **kw),
        lambda **kw: RandomBatchSampler(len(LABELS), 12, **kw),
    ],
)
def test_draw_ids_are_unique_and_start_batch_skips_exactly(make):
    sampler = make(seed=5)
    draws = [draw for epoch in range(3) for batch in _epoch(sampler, epoch) for _, draw in batch]
    assert len(draws) == len(set(draws)) == 3 * len(sampler) * 12
    full = _epoch(sampler, 1)
    assert _epoch(make(seed=5), 1, start_batch=2) == full[2:]
    assert _epoch(sampler, 1, start_batch=len(sampler)) == []
    assert _epoch(sampler, 1) == full  # set_epoch without start_batch resets it


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: ClassBalancedBatchSampler(LABELS, 24, 3, **kw),
        lambda **kw: ClassBalancedBatchSampler(LABELS, 24, 3, mode="cover", **kw),
        lambda **kw: RandomBatchSampler(len(LABELS), 24, **kw),
    ],
)
def test_rank_slices_concatenate_to_the_global_batch(make, world_size: int):
    whole = _epoch(make(seed=2), 1)
    parts = [_epoch(make(seed=2, rank=rank, world_size=world_size), 1) for rank in range(world_size)]
    assert all(len(part) == len(whole) for part in parts)
    for b, batch in enumerate(whole):
        assert [pair for part in parts for pair in part[b]] == batch


def test_random_sampler_is_a_permutation_without_last_partial_batch():
    sampler = RandomBatchSampler(25, 4, seed=1)
    indices = [i for batch in _epoch(sampler) for i in _indices(batch)]
    assert len(sampler) == 6 and len(indices) == 24 == len(set(indices))


def test_batches_per_epoch_override():
    assert len(ClassBalancedBatchSampler(LABELS, 12, 3, batches_per_epoch=50)) == 50
    cover = ClassBalancedBatchSampler(LABELS, 12, 3, mode="cover", batches_per_epoch=2)
    full = ClassBalancedBatchSampler(LABELS, 12, 3, mode="cover")
    assert _epoch(cover) == [[(i, d) for i, d in b] for b in _epoch(full)[:2]]


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (
            lambda: ClassBalancedBatchSampler(LABELS, 10, 3),
            "batch_size=10 is not a multiple of images_per_class=3",
        ),
        (lambda: ClassBalancedBatchSampler(LABELS, 33, 3), "11 classes per batch, but the data has only 10"),
        (lambda: ClassBalancedBatchSampler(np.arange(20), 24, 2), "batch_size=24 is larger than the dataset"),
        (lambda: ClassBalancedBatchSampler(LABELS, 0, 3), "batch_size=0"),
        (lambda: ClassBalancedBatchSampler(LABELS, 12, 0), "images_per_class=0"),
        (lambda: ClassBalancedBatchSampler([], 12, 3), "num_images=0"),
        (lambda: ClassBalancedBatchSampler(LABELS, 12, 3, mode="fast"), "unknown sampler mode 'fast'"),
        (
            lambda: ClassBalancedBatchSampler(LABELS, 12, 3, world_size=3),
            "world_size \\* images_per_class = 9",
        ),
        (lambda: ClassBalancedBatchSampler(LABELS, 12, 3, world_size=5), "not divisible by world_size=5"),
        (lambda: ClassBalancedBatchSampler(LABELS, 12, 3, rank=2, world_size=2), "rank=2"),
        (lambda: ClassBalancedBatchSampler(LABELS, 12, 3, seed=-1), "seed=-1"),
        (lambda: ClassBalancedBatchSampler(LABELS, 12, 3, batches_per_epoch=0), "batches_per_epoch=0"),
        (lambda: ClassBalancedBatchSampler(LABELS, 12, 3, mode="cover", batches_per_epoch=99), "at most"),
        (lambda: RandomBatchSampler(10, 11), "batch_size=11 is larger than the dataset"),
        (lambda: RandomBatchSampler(10, -2), "batch_size=-2"),
        (lambda: RandomBatchSampler(10, 2).set_epoch(0, start_batch=6), "start_batch=6"),
    ],
)
def test_bad_settings_are_one_line_config_errors(make, fragment: str):
    with pytest.raises(ConfigError, match=fragment) as error:
        make()
    assert "\n" not in str(error.value)
