"""Compute the embeddings of a whole dataset, in dataset order.

Rows are placed by the ``indices`` each batch carries, not by arrival order, so a shuffled (or, later, a
distributed) loader gives the same matrix. ``order_by_index`` is the single place that checks coverage: a
missing index is always an error; a repeated one is an error by default and is dropped with
``duplicates="drop"`` (what a distributed gather needs: ranks pad their last batch with repeated samples).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from dmlkd.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


def _unpack(batch: Any) -> tuple[Tensor, Tensor, Tensor]:
    """``Batch`` (a NamedTuple) or any ``(images, labels, indices)`` sequence."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 3:
        raise DataError(
            f"an evaluation loader must yield Batch or (images, labels, indices), got {type(batch).__name__}"
        )
    images, labels, indices = batch
    return images, torch.as_tensor(labels), torch.as_tensor(indices)


def _embedding_of(output: Any) -> Tensor:
    embedding = getattr(output, "embedding", output)
    if not isinstance(embedding, Tensor) or embedding.ndim != 2:
        raise DataError(f"the model must return a ModelOutput with a (B, D) .embedding, got {type(output).__name__}")
    return embedding


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def order_by_index(
    embeddings: Tensor,
    labels: Tensor,
    indices: Tensor,
    num_samples: int | None = None,
    duplicates: str = "error",
) -> tuple[Tensor, Tensor]:
    """Put rows in dataset order: row ``indices[i]`` of the result is row ``i`` of the input.

    Args:
        embeddings: ``(M, D)`` rows in arrival order.
        labels: ``(M,)`` labels in arrival order.
        indices: ``(M,)`` dataset positions in ``[0, num_samples)``.
        num_samples: dataset size (default: ``max(indices) + 1``); every position must be present.
        duplicates: ``"error"`` or ``"drop"`` (keep the first occurrence; repeats must
            carry the same label).

    Returns:
        ``(embeddings (num_samples, D), labels (num_samples,))``.
    """
    if duplicates not in ("error", "drop"):
        raise ConfigError(f"unknown duplicates policy {duplicates!r}; valid: drop, error")
    indices = torch.as_tensor(indices, device=embeddings.device).long()
    labels = torch.as_tensor(labels, device=embeddings.device).long()
    if not embeddings.shape[0] == labels.shape[0] == indices.shape[0]:
        raise DataError(f"got {embeddings.shape[0]} embeddings, {labels.shape[0]} labels, {indices.shape[0]} indices")
    if indices.numel() == 0:
        raise DataError("the evaluation loader yielded no samples")
    size = int(indices.max()) + 1 if num_samples is None else int(num_samples)
    if int(indices.min()) < 0 or int(indices.max()) >= size:
        raise DataError(f"sample indices must lie in [0, {size}), got [{int(indices.min())}, {int(indices.max())}]")
    # A stable sort keeps the first occurrence of each index first within its run of repeats.
    order = torch.argsort(indices, stable=True)
    sorted_indices = indices[order]
    first = torch.ones_like(sorted_indices, dtype=torch.bool)
    first[1:] = sorted_indices[1:] != sorted_indices[:-1]
    num_repeats = int((~first).sum())
    if num_repeats and duplicates == "error":
        repeated = sorted_indices[~first].unique()[:5].tolist()
        raise DataError(f"{num_repeats} samples were seen more than once (indices {repeated}...); a sampler bug?")
    keep = order[first]
    sorted_labels = labels[order]
    run = first.cumsum(dim=0) - 1  # which distinct index each sorted row belongs to
    if not torch.equal(sorted_labels, sorted_labels[first][run]):
        raise DataError("repeated samples carry different labels; the gathered results are inconsistent")
    if keep.numel() != size:
        present = torch.zeros(size, dtype=torch.bool, device=indices.device)
        present[indices] = True
        missing = torch.nonzero(~present).squeeze(1)[:5].tolist()
        raise DataError(f"{size - keep.numel()} of {size} samples were never embedded (indices {missing}...)")
    return embeddings[keep], labels[keep]


@torch.no_grad()
def extract_embeddings(
    model: nn.Module,
    loader: Iterable[Any],
    device: torch.device | str | None = None,
    progress: bool = True,
    output_device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Embed every sample of ``loader`` in eval mode; return ``(embeddings, labels)`` in dataset order.

    Args:
        model: returns a ``ModelOutput`` (its ``.embedding`` is used) or a ``(B, D)`` tensor. It is switched
            to eval mode and every submodule's previous train/eval flag is restored afterwards.
        loader: yields ``Batch`` or ``(images, labels, indices)``; ``indices`` are dataset positions. When it
            has a ``dataset`` with a length, all of its samples must appear exactly once.
        device: where the forward pass runs (default: the model's parameter device).
        progress: show a tqdm progress bar (when stderr is a terminal).
        output_device: where the result is gathered (default CPU, so a large test set does not sit
            on the GPU).

    Returns:
        ``embeddings`` ``(N, D)`` float32 and ``labels`` ``(N,)`` int64, row ``i`` = dataset item ``i``.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    try:
        # disable=None: no bar when stderr is not a terminal (logs, pipes), so an error stays one clean line
        bar = tqdm(loader, desc="embedding", unit="batch", disable=None if progress else True, leave=False)
        for batch in bar:
            images, labels, indices = _unpack(batch)
            embedding = _embedding_of(model(images.to(device, non_blocking=True)))
            parts.append((embedding.float().to(output_device), labels.to(output_device), indices.to(output_device)))
    finally:
        for module, training in modes.items():
            module.training = training
    if not parts:
        raise DataError("the evaluation loader yielded no batches")
    dataset = getattr(loader, "dataset", None)
    num_samples = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    embeddings, labels, indices = (torch.cat(column) for column in zip(*parts))
    return order_by_index(embeddings, labels, indices, num_samples)
