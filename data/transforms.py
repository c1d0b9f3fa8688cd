"""Replayable augmentations, the train/eval datasets that apply them, and their collate functions.

Randomness is a pure function of integer keys, never of worker scheduling or of global RNG state: the view
``v`` of the sample drawn with id ``draw`` (a run-unique id from the batch sampler) uses
``view_generator(seed, draw, v)``. For a teacher cache the views can instead be *replayed*: image ``i`` has
``num_sets`` stored parameter sets, set ``k`` drawn from ``view_generator(replay.seed, i, k)``, and the view
``(draw, v)`` uses set ``replay_choice(seed, draw, v, num_sets)``, so the cache is looked up by ``(i, k)``.

Train views follow torchvision ``RandomResizedCrop`` (scale, ratio, bilinear) + ``RandomHorizontalFlip`` +
``ToTensor``; the eval view is ``Resize(round(size * 256 / 224))`` + ``CenterCrop(size)`` + ``ToTensor``.
Tensors are float RGB in [0, 1]; normalisation belongs to the model's preprocessing.

Training views take one of two data paths (``TrainDataset.data_path``, config ``train.data_path``):

* ``"reduced"`` (default): each view decodes its JPEG at the smallest DCT scale ``1/s`` (s = 1, 2, 4, 8) that
  still leaves at least ``size`` pixels on the crop's shorter side (``view_reduction``), and its crop box,
  given in source pixels, is mapped exactly to the reduced image (``x / s``). The scale depends on the view's
  own parameters only, so a replayed view has the same pixels in the teacher cache and in training. Views
  are **uint8** ``(3, S, S)`` tensors laid out channels-last (HWC storage); the model converts them to float
  [0, 1] on its device (``x.float() / 255``, the same values ``ToTensor`` gives), so workers send a quarter
  of the bytes.
* ``"baseline"``: the previous path (full decode, float32 tensors built in the worker), kept for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from dmlkd.data.base import ImageCollection
from dmlkd.data.batch import Batch
from dmlkd.data.decode import as_uint8_array
from dmlkd.errors import ConfigError

_REPLAY_CHOICE = 1  # spawn key that separates replay choices from view parameter streams


@dataclass(frozen=True)
class ViewParams:
    """One view: crop box in source pixels (``top``, ``left``, ``height``, ``width``), then a mirror flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


@dataclass(frozen=True)
class ReplaySpec:
    """``num_sets`` stored view parameter sets per image, drawn from ``seed`` (for a teacher cache).

    ``refresh_draws`` > 0 draws a new generation of sets every ``refresh_draws`` sampler draws (the trainer uses
    ``E`` epochs' worth): draw ``d`` replays sets ``g * num_sets .. (g + 1) * num_sets - 1`` with
    ``g = d // refresh_draws``, so a run sees ``num_sets`` fresh views per image every ``E`` epochs.
    """

    num_sets: int
    seed: int
    refresh_draws: int = 0

    def __post_init__(self) -> None:
        if self.num_sets < 1 or self.seed < 0 or self.refresh_draws < 0:
            raise ConfigError(
                f"invalid replay num_sets={self.num_sets}, seed={self.seed}, refresh_draws={self.refresh_draws}; "
                "need num_sets >= 1, seed >= 0 and refresh_draws >= 0"
            )

    def generation(self, draw: int) -> int:
        """Which generation of sets the draw ``draw`` replays (always 0 without refresh)."""
        return int(draw) // self.refresh_draws if self.refresh_draws else 0


def _seed_int(*keys: int, spawn_key: tuple[int, ...] = ()) -> int:
    sequence = np.random.SeedSequence([int(key) for key in keys], spawn_key=spawn_key)
    return int(sequence.generate_state(1, np.uint64)[0])


def view_generator(seed: int, draw: int, view: int) -> torch.Generator:
    """A CPU generator seeded from a hash of ``(seed, draw, view)`` (all non-negative)."""
    generator = torch.Generator()
    generator.manual_seed(_seed_int(seed, draw, view))
    return generator


def replay_choice(seed: int, draw: int, view: int, num_sets: int) -> int:
    """Which stored parameter set ``k`` in ``[0, num_sets)`` the view ``(draw, view)`` replays.

    The views of one draw take the first entries of a random permutation of the K sets (seeded by the draw), so
    two views of an image never replay the same crop unless there are more views than sets; independent
    choices would make them identical with probability 1/K, which the online teacher never sees.
    """
    order = np.random.default_rng(_seed_int(seed, draw, spawn_key=(_REPLAY_CHOICE,))).permutation(num_sets)
    return int(order[view % num_sets])


def sample_view_params(
    generator: torch.Generator,
    width: int,
    height: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
) -> ViewParams:
    """Draw a ``RandomResizedCrop`` box and a flip from ``generator``.

    Same draws in the same order as torchvision: up to 10 tries of (area fraction ~ U(scale), log aspect
    ~ U(log ratio), top, left), then the central crop clamped to ``ratio``; then one uniform for the flip
    (``flip = u < flip_p``; drawn even when ``flip_p`` is 0 so the stream does not depend on it).
    """
    area = width * height
    log_ratio = torch.log(torch.tensor(ratio))
    params = None
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - crop_w + 1, size=(1,), generator=generator).item())
            params = (top, left, crop_h, crop_w)
            break
    if params is None:
        params = _central_crop(width, height, ratio)
    flip = bool(torch.rand(1, generator=generator).item() < flip_p)
    return ViewParams(*params, flip=flip)


def _central_crop(width: int, height: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        crop_w, crop_h = round(height * max(ratio)), height
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def _to_tensor(image: Image.Image) -> Tensor:
    """``(3, H, W)`` float in [0, 1], the same values as torchvision's ``to_tensor``."""
    array = np.array(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8, copy=True)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().to(torch.float32).div(255)


def apply_view(image: Image.Image, params: ViewParams, size: int) -> Tensor:
    """Crop the box, resize it bilinearly to ``size`` x ``size``, flip; returns ``(3, size, size)``."""
    box = (params.left, params.top, params.left + params.width, params.top + params.height)
    view = image.crop(box).resize((size, size), Image.Resampling.BILINEAR)
    if params.flip:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _to_tensor(view)


def view_reduction(params: ViewParams, size: int) -> int:
    """The largest decode scale ``s`` in 1, 2, 4, 8 at which the crop keeps ``>= size`` px on its shorter side.

    Such a view is resized down from the reduced image, never up from it, so it stays within interpolation
    tolerance of the full-size decode (a crop of at least ``2 * size`` px per side is needed for ``s = 2``).
    """
    scale = 1
    while scale < 8 and min(params.width, params.height) >= 2 * scale * size:
        scale *= 2
    return scale


def render_view(image: Image.Image, scale: int, params: ViewParams, size: int) -> np.ndarray:
    """The view ``params`` (source-pixel box) of an image decoded at ``1/scale``, as ``(S, S, 3)`` uint8.

    At ``scale == 1`` this is exactly ``apply_view`` (before the float conversion).
    """
    box = (params.left, params.top, params.left + params.width, params.top + params.height)
    if scale == 1:
        view = image.crop(box).resize((size, size), Image.Resampling.BILINEAR)
    else:  # a fractional box: PIL resamples the exact source region of the reduced image
        view = image.resize((size, size), Image.Resampling.BILINEAR, box=tuple(value / scale for value in box))
    if params.flip:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    return as_uint8_array(view)


def render_views(source, params: Sequence[ViewParams], size: int) -> Tensor:
    """``(V, 3, S, S)`` uint8 views of an ``ImageSource`` (channels-last strides), each decoded at its own
    ``view_reduction`` scale; a scale several views share is decoded once."""
    decoded: dict[int, tuple[Image.Image, int]] = {}
    arrays = []
    for view in params:
        scale = view_reduction(view, size)
        if scale not in decoded:
            decoded[scale] = source.decode(scale)
        image, actual = decoded[scale]
        arrays.append(render_view(image, actual, view, size))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def eval_view(image: Image.Image, size: int, resize_ratio: float | None = 256 / 224) -> Tensor:
    """Resize the shorter side to ``round(size * resize_ratio)`` (bilinear), centre-crop ``size``.

    ``resize_ratio`` None or 1.0 resizes the shorter side to ``size`` (no zoom-in), for centred data.
    """
    resize_ratio = 1.0 if resize_ratio is None else resize_ratio
    if not 1.0 <= resize_ratio < float("inf"):  # NaN and inf too
        raise ConfigError(f"eval resize ratio {resize_ratio} is invalid; use a finite ratio >= 1 (1 = no zoom-in)")
    short = round(size * resize_ratio)
    width, height = image.size
    if width <= height:
        new_size = (short, int(short * height / width))
    else:
        new_size = (int(short * width / height), short)
    image = image.resize(new_size, Image.Resampling.BILINEAR)
    top = round((new_size[1] - size) / 2.0)
    left = round((new_size[0] - size) / 2.0)
    return _to_tensor(image.crop((left, top, left + size, top + size)))


def replay_view_params(
    replay: ReplaySpec, index: int, k: int, width: int, height: int, *crop: Any, **named_crop: Any
) -> ViewParams:
    """The ``k``-th stored parameter set of image ``index`` (of size ``width`` x ``height``).

    The crop options after the size (``scale``, ``ratio``, ``flip_p``, by position or by name) go to
    ``sample_view_params`` unchanged, so the two functions share one set of defaults.
    """
    return sample_view_params(view_generator(replay.seed, index, k), width, height, *crop, **named_crop)


def replay_keys(keys: Sequence[tuple[int, int]], views: int, seed: int, replay: ReplaySpec) -> list[tuple[int, int]]:
    """The ``(image index, k)`` pair of every view of a sampler batch, view-major like ``Batch``."""
    sets = replay.num_sets
    return [
        (index, replay_choice(seed, draw, view, sets) + replay.generation(draw) * sets)
        for view in range(views)
        for index, draw in keys
    ]


def _check_scale_ratio(scale: tuple[float, float], ratio: tuple[float, float], flip_p: float) -> None:
    if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]) or not (0 <= flip_p <= 1):
        raise ConfigError(
            f"invalid crop scale={tuple(scale)}, ratio={tuple(ratio)} or flip_p={flip_p}; need "
            "0 < scale[0] <= scale[1] <= 1, 0 < ratio[0] <= ratio[1] and 0 <= flip_p <= 1"
        )


DATA_PATHS = ("reduced", "baseline")


@dataclass(eq=False)  # compared by identity, as a Dataset
class TrainDataset(Dataset):
    """Training views of a collection, keyed by the ``(index, draw)`` pairs a batch sampler yields.

    ``__getitem__((index, draw))`` returns ``(views (V, 3, S, S), label, index, replay_k (V,))``;
    ``replay_k`` holds the replayed parameter set of each view, or -1 when ``replay`` is None. Views are uint8
    (``data_path = "reduced"``, the default) or float in [0, 1] (``"baseline"``); see the module docstring.
    The fields are the settings; they are checked when the dataset is made.
    """

    collection: ImageCollection
    image_size: int
    views: int = 1
    seed: int = 0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    replay: ReplaySpec | None = None
    data_path: ClassVar[str] = "reduced"  # the class default; a dataset may set its own

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.views < 1 or self.seed < 0:
            raise ConfigError(
                f"invalid image_size={self.image_size}, views={self.views} or seed={self.seed}; need "
                "image_size >= 1, views >= 1 and seed >= 0"
            )
        _check_scale_ratio(self.scale, self.ratio, self.flip_p)
        self.scale, self.ratio = tuple(self.scale), tuple(self.ratio)  # lists from a config file become tuples

    def __len__(self) -> int:
        return len(self.collection)

    def view_params(self, index: int, draw: int, view: int, width: int, height: int) -> tuple[ViewParams, int]:
        """The parameters of view ``view`` of draw ``draw`` and the replayed set ``k`` (-1 without replay)."""
        if self.replay is None:
            generator = view_generator(self.seed, draw, view)
            return sample_view_params(generator, width, height, self.scale, self.ratio, self.flip_p), -1
        k = replay_choice(self.seed, draw, view, self.replay.num_sets)
        k += self.replay.generation(draw) * self.replay.num_sets
        params = replay_view_params(self.replay, index, k, width, height, self.scale, self.ratio, self.flip_p)
        return params, k

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int, int, Tensor]:
        index, draw = (int(part) for part in key)
        label = int(self.collection.labels[index])
        if self.data_path == "reduced":
            source = self.collection.open(index)
            chosen = [self.view_params(index, draw, view, *source.size) for view in range(self.views)]
            views = render_views(source, [params for params, _ in chosen], self.image_size)
            return views, label, index, torch.tensor([k for _, k in chosen], dtype=torch.long)
        image = self.collection.load(index)
        tensors, ks = [], []
        for view in range(self.views):
            params, k = self.view_params(index, draw, view, *image.size)
            tensors.append(apply_view(image, params, self.image_size))
            ks.append(k)
        return torch.stack(tensors), label, index, torch.tensor(ks, dtype=torch.long)


class EvalDataset(Dataset):
    """The deterministic eval view of every image: ``__getitem__(i) -> (tensor (3, S, S), label, i)``."""

    def __init__(self, collection: ImageCollection, image_size: int, resize_ratio: float | None = 256 / 224) -> None:
        if image_size < 1 or (resize_ratio is not None and resize_ratio < 1.0):
            raise ConfigError(
                f"invalid image_size={image_size} or resize_ratio={resize_ratio}; need image_size >= 1 "
                "and resize_ratio >= 1"
            )
        self.collection = collection
        self.image_size = image_size
        self.resize_ratio = resize_ratio

    def __len__(self) -> int:
        return len(self.collection)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        image = self.collection.load(index)
        return eval_view(image, self.image_size, self.resize_ratio), int(self.collection.labels[index]), index


def collate_views(items: Sequence[tuple[Tensor, int, int, Tensor]]) -> tuple[Batch, Tensor]:
    """Collate ``TrainDataset`` items into ``(Batch, replay_k)``, both view-major.

    Returns:
        ``Batch`` with ``images (V*B, 3, S, S)`` where row ``i + v*B`` is view ``v`` of item ``i``, and
        ``labels``/``indices (V*B,)`` repeated the same way; ``replay_k (V*B,)`` long, -1 without replay.
    """
    if items[0][0].dtype == torch.uint8:  # channels-last views: stack the HWC storage, a plain copy
        stacked = torch.stack([item[0].permute(0, 2, 3, 1) for item in items], dim=1)  # (V, B, S, S, 3)
        views = stacked.permute(0, 1, 4, 2, 3)
    else:
        views = torch.stack([item[0] for item in items], dim=1)  # (V, B, 3, S, S)
    count = views.shape[0]
    labels = torch.tensor([item[1] for item in items], dtype=torch.long).repeat(count)
    indices = torch.tensor([item[2] for item in items], dtype=torch.long).repeat(count)
    replay_k = torch.stack([item[3] for item in items], dim=1).reshape(-1)
    images = views.flatten(0, 1)  # a view for both layouts: V and B are the outer dimensions
    return Batch(images, labels, indices), replay_k


def collate_eval(items: Sequence[tuple[Tensor, int, int]]) -> Batch:
    """Collate ``EvalDataset`` items into a single-view ``Batch``."""
    images = torch.stack([item[0] for item in items])
    labels = torch.tensor([item[1] for item in items], dtype=torch.long)
    indices = torch.tensor([item[2] for item in items], dtype=torch.long)
    return Batch(images, labels, indices)
