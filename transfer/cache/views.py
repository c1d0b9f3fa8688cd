"""Running the teacher on every cached view of the training images (one process or several)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dmlkd.data.base import ImageCollection
from dmlkd.data.transforms import eval_view, render_views, replay_view_params
from dmlkd.engine.distributed import gather_uneven, rank, shard_batches, world_size
from dmlkd.errors import DataError
from dmlkd.numerics import autocast_disabled
from dmlkd.transfer.cache.spec import CacheSpec


class CacheViewDataset(Dataset):
    """Item ``j`` -> ``(views (K, 3, S, S), j)``: the ``K`` cached views of image ``start + j``, loaded once.

    The views are the sets ``spec.first_set .. spec.first_set + K - 1`` of that image.
    """

    def __init__(self, collection: ImageCollection, spec: CacheSpec, start: int = 0, stop: int | None = None) -> None:
        self.collection, self.spec = collection, spec
        self.start, self.stop = start, len(collection) if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, item: int) -> tuple[Tensor, int]:
        spec, index = self.spec, self.start + item
        if spec.mode == "clean":
            image = self.collection.load(index)
            return eval_view(image, spec.image_size, spec.eval_resize_ratio).unsqueeze(0), item
        # The training path's own view rendering (uint8, per-view decode scale), so replayed views are exact.
        source = self.collection.open(index)
        params = [
            replay_view_params(spec.replay, index, k, *source.size, spec.scale, spec.ratio, spec.flip_p)
            for k in range(spec.first_set, spec.first_set + spec.num_sets)
        ]
        return render_views(source, params, spec.image_size), item


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


@torch.no_grad()
def run_teacher(
    teacher: nn.Module,
    collection: ImageCollection,
    spec: CacheSpec,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    progress: bool | tqdm,
    start: int = 0,
    stop: int | None = None,
) -> dict[str, Tensor]:
    """The cached outputs of images ``start .. stop - 1``, on the CPU in fp16: ``{"embeddings": (n, K, D)
    [, "pooled": (n, K, P)]}`` (``progress`` may be an open ``tqdm`` bar to advance).

    With several processes each runs the teacher on its share of the single-process batches and the rows
    are gathered, so every process returns the whole (identical) result.
    """
    stop = len(collection) if stop is None else stop
    count, sets = stop - start, spec.num_sets
    loader = DataLoader(
        CacheViewDataset(collection, spec, start, stop),
        batch_sampler=shard_batches(count, max(1, batch_size // sets), rank(), world_size()),
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    names = ("embeddings", "pooled") if spec.with_pooled else ("embeddings",)
    store: dict[str, Tensor] = {}
    filled = torch.zeros(count, dtype=torch.bool)
    # The teacher runs at ``spec.autocast`` (None: fp32, also when called inside a training autocast region).
    if spec.autocast:
        autocast = torch.autocast(device.type, dtype=getattr(torch, spec.autocast))
    else:
        autocast = autocast_disabled(device)
    if isinstance(progress, tqdm):
        bar_context: contextlib.AbstractContextManager = contextlib.nullcontext(progress)
    else:
        bar_context = tqdm(total=count, desc="teacher cache", unit="img", disable=not progress)
    with _eval_mode(teacher), bar_context as bar:
        for views, indices in loader:
            with autocast:
                output = teacher(views.flatten(0, 1).to(device, non_blocking=True))
            for name, value in zip(names, (output.embedding, output.pooled)):
                value = value.reshape(len(indices), sets, -1).to(torch.float16).cpu()
                if name not in store:
                    store[name] = torch.zeros((count, sets, value.shape[-1]), dtype=torch.float16)
                store[name][indices] = value
            filled[indices] = True
            bar.update(len(indices))
    if world_size() > 1:
        store, filled = _gather_shards(store, filled, names, sets)
    if count == 0 or not bool(filled.all()):
        raise DataError(f"the teacher cache covers {int(filled.sum())} of {count} images; nothing to cache")
    return store


def _gather_shards(
    store: dict[str, Tensor], filled: Tensor, names: tuple[str, ...], sets: int
) -> tuple[dict[str, Tensor], Tensor]:
    """Every process's filled rows put together (rows travel flattened: a process may have none)."""
    mine = torch.nonzero(filled).squeeze(1)
    rows = torch.cat(gather_uneven(mine))
    merged: dict[str, Tensor] = {}
    for name in names:
        local = store[name][mine].flatten() if name in store else torch.zeros(0, dtype=torch.float16)
        values = torch.cat(gather_uneven(local.float())).to(torch.float16)  # fp16 -> fp32 -> fp16 is exact
        values = values.reshape(rows.numel(), sets, -1)
        merged[name] = torch.zeros((filled.numel(), sets, values.shape[-1]), dtype=torch.float16)
        merged[name][rows] = values
    everywhere = torch.zeros_like(filled)
    everywhere[rows] = True
    return merged, everywhere
