"""Training data for both stages: the train split, its replayable views and the P x K (or random) sampler."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from dmlkd.config.resolve import STANDARD_AUGMENTATION
from dmlkd.config.sections import TrainConfig
from dmlkd.data.base import DatasetSplits
from dmlkd.data.loading import make_train_loader
from dmlkd.data.samplers import ClassBalancedBatchSampler, RandomBatchSampler
from dmlkd.data.transforms import TrainDataset
from dmlkd.devices import resolve_device
from dmlkd.errors import DataError

DEFAULT_IMAGE_SIZE = 224


@dataclass
class TrainData:
    dataset: Any  # dmlkd.data.transforms.TrainDataset
    sampler: Any  # a batch sampler with set_epoch / start_batch
    batches_per_epoch: int
    num_classes: int
    loader_factory: Callable[[int, int], Iterable[Any]]


def train_image_size(train: TrainConfig, splits: DatasetSplits) -> int:
    return int(train.image_size or splits.defaults.get("image_size", DEFAULT_IMAGE_SIZE))


@dataclass(frozen=True)
class Augmentation:
    """The random-view parameters of a run: the one place that merges the config with the dataset's defaults.

    Used for the training views and for the teacher cache's key and replayed views alike.
    """

    image_size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    flip_p: float


def augmentation(train: TrainConfig, splits: DatasetSplits) -> Augmentation:
    """``train``'s crop scale, aspect ratio and flip probability, or the dataset's defaults where unset."""
    defaults = {**STANDARD_AUGMENTATION, **splits.defaults}
    return Augmentation(
        image_size=train_image_size(train, splits),
        scale=tuple(float(v) for v in (train.crop_scale or defaults["crop_scale"])),  # type: ignore[arg-type]
        ratio=tuple(float(v) for v in (train.crop_ratio or defaults["crop_ratio"])),  # type: ignore[arg-type]
        flip_p=float(train.flip_p if train.flip_p is not None else defaults["flip_p"]),
    )


def _num_classes(labels: Any) -> int:
    classes = sorted(set(int(label) for label in labels))
    if classes != list(range(len(classes))):
        raise DataError(
            f"training labels must be 0..C-1 without gaps; found {len(classes)} classes with "
            f"labels from {classes[0]} to {classes[-1]}"
        )
    return len(classes)


def _pin_memory(train: TrainConfig) -> bool:
    """Pinned host batches (asynchronous copies) whenever the run trains on CUDA."""

    return resolve_device(train.device).type == "cuda"


def build_train_data(
    splits: DatasetSplits, train: TrainConfig, replay: Any = None, rank: int = 0, world_size: int = 1
) -> TrainData:
    """The train split wrapped in replayable multi-view augmentation, a batch sampler and a loader factory.

    ``train.batch_size`` is the global batch: with ``world_size`` processes, process ``rank`` loads the
    contiguous ``batch_size / world_size`` slice of every global batch (``dmlkd.data.samplers``), so equal
    global batches give the same sampled images and augmentations for any number of processes.
    """

    collection = splits.train
    # The dataset takes the resolved augmentation (image size, crop scale and ratio, flip) field by field.
    augment = asdict(augmentation(train, splits))
    dataset = TrainDataset(collection, views=train.views, seed=train.seed, replay=replay, **augment)
    dataset.data_path = train.data_path  # "reduced" (uint8, reduced-size JPEG decode) or "baseline"
    if train.ipc is not None:
        sampler = ClassBalancedBatchSampler(
            collection.labels,
            train.batch_size,
            train.ipc,
            seed=train.seed,
            mode=train.sampler_mode,
            rank=rank,
            world_size=world_size,
        )
    else:
        sampler = RandomBatchSampler(
            len(collection), train.batch_size, seed=train.seed, rank=rank, world_size=world_size
        )

    loader = make_train_loader(dataset, sampler, num_workers=train.num_workers, pin_memory=_pin_memory(train))

    def loader_factory(epoch: int, start_batch: int) -> Iterable[Any]:
        # The batch sampler runs in the main process, so one loader (and its workers) serves every epoch.
        sampler.set_epoch(epoch, start_batch)
        return loader

    return TrainData(dataset, sampler, len(sampler), _num_classes(collection.labels), loader_factory)
