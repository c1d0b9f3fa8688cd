"""DataLoaders for training (driven by a batch sampler) and evaluation (fixed order).

Augmentations are keyed by the sampler's draw ids, so batches do not depend on ``num_workers``; workers are
still seeded deterministically (numpy, ``random``) for any third-party code that draws from global state.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dmlkd.data.base import ImageCollection
from dmlkd.data.transforms import EvalDataset, TrainDataset, collate_eval, collate_views
from dmlkd.errors import ConfigError


def seed_worker(worker_id: int) -> None:
    """Seed numpy and ``random`` in a worker from its torch seed (base seed + worker id)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _check_workers(num_workers: int) -> None:
    if num_workers < 0:
        raise ConfigError(f"num_workers={num_workers} is invalid; expected an integer >= 0")


def _loader(
    dataset: Dataset, collate: Callable, num_workers: int, pin_memory: bool, seed: int, **batching: Any
) -> DataLoader:
    """A ``DataLoader`` with seeded workers kept alive between epochs; ``batching`` says how rows are batched."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        worker_init_fn=seed_worker,
        generator=generator,
        persistent_workers=num_workers > 0,
        **batching,
    )


def make_train_loader(
    dataset: TrainDataset, sampler: Sampler, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """A loader yielding ``(Batch, replay_k)`` per sampler batch (see ``collate_views``), view-major."""
    _check_workers(num_workers)
    return _loader(dataset, collate_views, num_workers, pin_memory, dataset.seed, batch_sampler=sampler)


def make_eval_loader(
    collection: ImageCollection,
    image_size: int,
    batch_size: int = 128,
    num_workers: int = 0,
    resize_ratio: float | None = 256 / 224,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader yielding single-view ``Batch`` es of the eval view in collection order (last batch kept)."""
    _check_workers(num_workers)
    if batch_size < 1:
        raise ConfigError(f"eval batch_size={batch_size} is invalid; expected a positive integer")
    dataset = EvalDataset(collection, image_size, resize_ratio)
    return _loader(dataset, collate_eval, num_workers, pin_memory, 0, batch_size=batch_size, shuffle=False)
