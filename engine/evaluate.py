"""Evaluate an embedding model on a dataset's test protocol (leave-one-out or query/gallery)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dmlkd.config import EvalCommandConfig, EvalConfig
from dmlkd.data.base import DatasetSplits, ImageCollection
from dmlkd.errors import ConfigError

DEFAULT_IMAGE_SIZE = 224


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available; an unavailable explicit device is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but CUDA is not available here; use --device cpu")
    return device


def eval_image_size(config: EvalConfig, splits: DatasetSplits) -> int:
    return int(config.image_size or splits.defaults.get("image_size", DEFAULT_IMAGE_SIZE))


def embed_collection(
    model: nn.Module,
    collection: ImageCollection,
    config: EvalConfig,
    image_size: int,
    resize_ratio: float | None,
    device: torch.device,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    from dmlkd.data.loading import make_eval_loader
    from dmlkd.evaluation import extract_embeddings

    loader = make_eval_loader(
        collection,
        image_size,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        resize_ratio=resize_ratio,
    )
    return extract_embeddings(model, loader, device=device, progress=progress)


def evaluate_model(
    model: nn.Module, splits: DatasetSplits, config: EvalConfig, device: torch.device, progress: bool = True
) -> dict[str, float]:
    """Recall@K (the dataset's K unless ``config.ks``), MAP@R and NMI of ``model`` on the test split."""
    from dmlkd.evaluation import evaluate_embeddings

    image_size = eval_image_size(config, splits)
    resize_ratio = splits.defaults.get("eval_resize_ratio", 256 / 224)
    ks = tuple(config.ks or splits.recall_ks)
    if splits.query is not None and splits.gallery is not None:
        query, query_labels = embed_collection(
            model, splits.query, config, image_size, resize_ratio, device, progress
        )
        gallery, gallery_labels = embed_collection(
            model, splits.gallery, config, image_size, resize_ratio, device, progress
        )
        sides = {"gallery": gallery, "gallery_labels": gallery_labels}
    else:
        query, query_labels = embed_collection(
            model, splits.test, config, image_size, resize_ratio, device, progress
        )
        sides = {}
    results = evaluate_embeddings(
        query,
        query_labels,
        ks=ks,
        metric=config.metric,
        compute_nmi=config.nmi,
        seed=config.seed,
        backend=config.backend,
        **sides,
    )
    if config.second_metric and config.second_metric != config.metric:
        extra = evaluate_embeddings(
            query,
            query_labels,
            ks=ks,
            metric=config.second_metric,
            compute_nmi=False,
            backend=config.backend,
            **sides,
        )
        results.update(
            {
                f"{config.second_metric}/{key}": value
                for key, value in extra.items()
                if key.startswith("recall@")
            }
        )
    return results


def run_eval_command(config: EvalCommandConfig) -> dict[str, Any]:
    """``dmlkd eval``: load the checkpoint, read the dataset, evaluate."""
    from dmlkd.checkpoints import load_checkpoint
    from dmlkd.data.catalog import build_splits

    device = resolve_device(config.device)
    model, _record = load_checkpoint(config.checkpoint, device=device)
    splits, _bad = build_splits(config.data)
    return evaluate_model(model, splits, config.eval, device)
