"""Batch samplers over a global batch, yielding ``(index, draw)`` pairs.

Every sampler builds the *global* batch (all processes together) from ``(seed, epoch, batch)`` alone and
yields rank ``rank``'s contiguous slice of it, so ``world_size`` processes with the same settings see
disjoint parts of the same batches, and concatenating their slices gives the ``world_size=1`` batch. The
``draw`` of a sample is ``(epoch * len(self) + batch) * batch_size + position`` (position in the global
batch): unique in the whole run, it keys the sample's random augmentation (``dmlkd.data.transforms``).
``set_epoch(epoch, start_batch)`` selects the epoch and skips its first batches when resuming.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from dmlkd.errors import ConfigError

_REFERENCE, _COVER, _RANDOM = 0, 1, 2  # stream tags: the samplers never share random numbers


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ConfigError(f"{name}={value!r} is invalid; expected a positive integer")


def _check_ranks(seed: int, rank: int, world_size: int) -> None:
    if seed < 0:
        raise ConfigError(f"sampler seed={seed} is invalid; expected an integer >= 0")
    _check_positive(world_size=world_size)
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank={rank} is invalid for world_size={world_size}; expected 0..{world_size - 1}")


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(key) for key in keys]))


class _GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Shared epoch, resume and rank-slicing logic; subclasses build global batches of positions."""

    def __init__(self, batch_size: int, seed: int, rank: int, world_size: int) -> None:
        _check_positive(batch_size=batch_size)
        _check_ranks(seed, rank, world_size)
        if batch_size % world_size:
            raise ConfigError(
                f"batch_size={batch_size} is not divisible by world_size={world_size}; use a multiple of {world_size}"
            )
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select ``epoch`` and skip its first ``start_batch`` batches (to resume mid-epoch)."""
        if epoch < 0 or not 0 <= start_batch <= len(self):
            raise ConfigError(
                f"invalid epoch={epoch} or start_batch={start_batch}; need epoch >= 0 and "
                f"0 <= start_batch <= {len(self)}"
            )
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        """Batches per (full) epoch, including any skipped with ``start_batch``."""
        raise NotImplementedError

    def global_batch(self, batch: int) -> np.ndarray:
        """Dataset positions of global batch ``batch`` of the current epoch, shape ``(batch_size,)``."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        local = self.batch_size // self.world_size
        begin = self.rank * local
        for batch in range(self.start_batch, len(self)):
            positions = self.global_batch(batch)
            first_draw = (self.epoch * len(self) + batch) * self.batch_size
            yield [(int(positions[p]), first_draw + p) for p in range(begin, begin + local)]


class RandomBatchSampler(_GlobalBatchSampler):
    """A fresh permutation per epoch cut into ``num_samples // batch_size`` batches (drop_last)."""

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(batch_size, seed, rank, world_size)
        _check_positive(num_samples=num_samples)
        if batch_size > num_samples:
            raise ConfigError(
                f"batch_size={batch_size} is larger than the dataset ({num_samples} images); use at most {num_samples}"
            )
        self.num_samples = num_samples
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.num_samples // self.batch_size

    def global_batch(self, batch: int) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, _rng(self.seed, self.epoch, _RANDOM).permutation(self.num_samples))
        return self._order[1][batch * self.batch_size : (batch + 1) * self.batch_size]


class ClassBalancedBatchSampler(_GlobalBatchSampler):
    """P classes x K images per batch (``P = batch_size / images_per_class``), grouped by class.

    ``mode="reference"`` (seed-spec §5.2): each batch draws P distinct classes uniformly and K images of each
    *with* replacement; an epoch is ``len(labels) // batch_size`` batches; nothing guarantees coverage.

    ``mode="cover"``: every image is drawn at least once per epoch. Each class is shuffled and cut into
    groups of K; a class whose size is not a multiple of K gets its last group topped up with other images
    of the same class (repeats). The groups are dealt into ``L = max(ceil(G / P), largest class's group
    count)`` batches so that no batch holds a class twice; the ``L * P - G`` slots left over are filled with
    K random images of classes not yet in that batch (more repeats). Batch order and group order inside a
    batch are shuffled per epoch.

    ``batches_per_epoch`` overrides the epoch length (in cover mode it may only shorten it, which then drops
    the last batches' coverage).
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        batch_size: int,
        images_per_class: int,
        seed: int = 0,
        mode: str = "reference",
        rank: int = 0,
        world_size: int = 1,
        batches_per_epoch: int | None = None,
    ) -> None:
        super().__init__(batch_size, seed, rank, world_size)
        labels = np.asarray(labels, dtype=np.int64)
        _check_positive(images_per_class=images_per_class, num_images=len(labels))
        self._validate(labels, batch_size, images_per_class, mode, world_size)
        _, inverse = np.unique(labels, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        self.members = np.split(order, np.cumsum(np.bincount(inverse))[:-1])  # positions of each class
        self.num_images = len(labels)
        self.images_per_class = images_per_class
        self.classes_per_batch = batch_size // images_per_class
        self.mode = mode
        self._groups_per_class = np.array([math.ceil(len(m) / images_per_class) for m in self.members])
        natural = self._natural_length()
        if batches_per_epoch is not None:
            _check_positive(batches_per_epoch=batches_per_epoch)
            if mode == "cover" and batches_per_epoch > natural:
                raise ConfigError(
                    f"batches_per_epoch={batches_per_epoch} exceeds the {natural} batches cover mode needs "
                    f"for one pass; use at most {natural} or mode='reference'"
                )
        self.batches_per_epoch = batches_per_epoch or natural
        self._plan: tuple[int, np.ndarray] | None = None

    @staticmethod
    def _validate(labels: np.ndarray, batch_size: int, per_class: int, mode: str, world_size: int) -> None:
        if mode not in ("reference", "cover"):
            raise ConfigError(f"unknown sampler mode {mode!r}; choose from: cover, reference")
        if batch_size % per_class:
            raise ConfigError(
                f"batch_size={batch_size} is not a multiple of images_per_class={per_class}; "
                f"use e.g. {max(1, batch_size // per_class) * per_class}"
            )
        if batch_size % (world_size * per_class):
            raise ConfigError(
                f"batch_size={batch_size} must be divisible by world_size * images_per_class = "
                f"{world_size * per_class} so every process gets whole classes"
            )
        num_classes = len(np.unique(labels))
        if batch_size // per_class > num_classes:
            raise ConfigError(
                f"batch_size={batch_size} / images_per_class={per_class} = {batch_size // per_class} classes "
                f"per batch, but the data has only {num_classes}; use batch_size <= {num_classes * per_class}"
            )
        if batch_size > len(labels):
            raise ConfigError(
                f"batch_size={batch_size} is larger than the dataset ({len(labels)} images); use at most {len(labels)}"
            )

    def _natural_length(self) -> int:
        if self.mode == "reference":
            return self.num_images // self.batch_size
        groups = int(self._groups_per_class.sum())
        return max(math.ceil(groups / self.classes_per_batch), int(self._groups_per_class.max()))

    def __len__(self) -> int:
        return self.batches_per_epoch

    def global_batch(self, batch: int) -> np.ndarray:
        if self.mode == "reference":
            return self._reference_batch(batch)
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, self._cover_plan())
        return self._plan[1][batch]

    def _reference_batch(self, batch: int) -> np.ndarray:
        rng = _rng(self.seed, self.epoch, batch, _REFERENCE)
        chosen = rng.choice(len(self.members), self.classes_per_batch, replace=False)
        picks = [self.members[c][rng.integers(0, len(self.members[c]), self.images_per_class)] for c in chosen]
        return np.concatenate(picks)

    def _class_groups(self, rng: np.random.Generator, members: np.ndarray) -> np.ndarray:
        """``(ceil(n / K), K)`` groups covering a shuffled class once, the last one topped up by repeats."""
        per_class = self.images_per_class
        shuffled = rng.permutation(members)
        missing = -len(shuffled) % per_class
        if missing:
            full = shuffled[: len(shuffled) - (per_class - missing)]  # not in the partial last group
            pool, replace = (full, False) if len(full) >= missing else (members, True)
            shuffled = np.concatenate([shuffled, rng.choice(pool, missing, replace=replace)])
        return shuffled.reshape(-1, per_class)

    def _cover_plan(self) -> np.ndarray:
        """``(len, batch_size)`` positions of one covering epoch (see the class docstring)."""
        rng = _rng(self.seed, self.epoch, _COVER)
        rows, columns = self._natural_length(), self.classes_per_batch
        group_classes, groups = [], []
        for c in rng.permutation(len(self.members)):
            class_groups = self._class_groups(rng, self.members[c])
            groups.extend(class_groups)
            group_classes.extend([c] * len(class_groups))
        # Column-major dealing: a class's groups are consecutive and at most `rows` long, so they land in
        # distinct rows (batches).
        grid = np.full((rows, columns, self.images_per_class), -1, dtype=np.int64)
        grid_class = np.full((rows, columns), -1, dtype=np.int64)
        for slot, (c, group) in enumerate(zip(group_classes, groups)):
            grid[slot % rows, slot // rows] = group
            grid_class[slot % rows, slot // rows] = c
        for slot in range(len(groups), rows * columns):
            row, column = slot % rows, slot // rows
            free = np.setdiff1d(np.arange(len(self.members)), grid_class[row])
            c = int(rng.choice(free))
            members = self.members[c]
            grid[row, column] = rng.choice(members, self.images_per_class, replace=len(members) < self.images_per_class)
            grid_class[row, column] = c
        grid = grid[rng.permutation(rows)]
        grid = np.stack([batch[rng.permutation(columns)] for batch in grid])
        return grid.reshape(rows, -1)[: self.batches_per_epoch]
