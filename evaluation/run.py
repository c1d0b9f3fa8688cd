"""Evaluate an embedding model on a dataset's test protocol (leave-one-out or query/gallery)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from dmlkd.checkpoints.io import load_checkpoint, resolve_checkpoint_dir
from dmlkd.checkpoints.selection import selection_note, selection_of
from dmlkd.config.sections import EvalCommandConfig, EvalConfig, TrainConfig
from dmlkd.data.base import DatasetSplits, ImageCollection
from dmlkd.data.catalog import build_splits
from dmlkd.data.loading import make_eval_loader
from dmlkd.data.training import train_image_size
from dmlkd.data.transforms import EvalDataset, collate_eval
from dmlkd.devices import resolve_device
from dmlkd.engine.distributed import (
    call_on_main,
    gather_uneven,
    init_processes,
    is_main,
    launched,
    rank,
    shard_batches,
    world_size,
)
from dmlkd.evaluation.extract import extract_embeddings, order_by_index
from dmlkd.evaluation.metrics import evaluate_embeddings
from dmlkd.models.inputs import DEFAULT_RESIZE_RATIO, input_record, recorded_image_size, recorded_resize_ratio

log = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 224


def eval_image_size(config: EvalConfig, splits: DatasetSplits) -> int:
    return int(config.image_size or splits.defaults.get("image_size", DEFAULT_IMAGE_SIZE))


def eval_resize_ratio(config: EvalConfig, splits: DatasetSplits) -> float:
    """Resize to ``image_size * ratio`` before the centre crop: the config's, else the dataset's (256/224)."""
    if config.resize_ratio is not None:
        return float(config.resize_ratio)
    return float(splits.defaults.get("eval_resize_ratio", 256 / 224))


def run_input_record(train: TrainConfig, evaluation: EvalConfig, splits: DatasetSplits) -> dict[str, Any]:
    """``input_record`` of a training run: its resolved eval view (``EvalConfig`` and the dataset's defaults,
    as the run's own evaluation uses them) and training crop size (``TrainConfig``)."""
    resize_ratio = splits.defaults.get("eval_resize_ratio", DEFAULT_RESIZE_RATIO)
    return input_record(eval_image_size(evaluation, splits), resize_ratio, train_image_size(train, splits))


def embed_collection(
    model: nn.Module,
    collection: ImageCollection,
    config: EvalConfig,
    image_size: int,
    resize_ratio: float | None,
    device: torch.device,
    progress: bool = True,
    distributed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeddings (N, D) float32, labels (N,))`` of ``collection`` in dataset order, on the CPU.

    With ``distributed`` (every process of the group must call it), each process embeds its share of the
    single-process batches and the rows are gathered and put in dataset order by sample index (repeats
    dropped), so every process returns the single-process result.
    """
    if distributed and world_size() > 1:
        dataset = EvalDataset(collection, image_size, resize_ratio)
        return _embed_distributed(model, dataset, config, device, progress)

    loader = make_eval_loader(
        collection,
        image_size,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        resize_ratio=resize_ratio,
    )
    return extract_embeddings(model, loader, device=device, progress=progress)


@torch.no_grad()
def _embed_distributed(
    model: nn.Module, dataset: EvalDataset, config: EvalConfig, device: torch.device, progress: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    batches = shard_batches(len(dataset), config.batch_size, rank(), world_size())
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=config.num_workers,
        collate_fn=collate_eval,
    )
    modes = {module: module.training for module in model.modules()}
    model.eval()
    rows, labels, indices = [], [], []
    try:
        for batch in tqdm(loader, desc="embedding", unit="batch", disable=not (progress and is_main())):
            output = model(batch.images.to(device, non_blocking=True))
            rows.append(getattr(output, "embedding", output).float().cpu())
            labels.append(batch.labels)
            indices.append(batch.indices)
    finally:
        for module, training in modes.items():
            module.training = training
    flat = torch.cat(rows).flatten() if rows else torch.zeros(0)
    local_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    local_indices = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)
    all_indices = torch.cat(gather_uneven(local_indices))
    all_labels = torch.cat(gather_uneven(local_labels))
    values = torch.cat(gather_uneven(flat))
    embeddings = values.reshape(all_indices.numel(), -1)
    return order_by_index(embeddings, all_labels, all_indices, len(dataset), duplicates="drop")


def evaluate_model(
    model: nn.Module,
    splits: DatasetSplits,
    config: EvalConfig,
    device: torch.device,
    progress: bool = True,
    distributed: bool = False,
    resize_ratio: float | None = None,
) -> dict[str, float]:
    """Recall@K (the dataset's K unless ``config.ks``), MAP@R and NMI of ``model`` on the test split.

    With ``distributed`` every process of the group must call it: the processes share the embedding work
    (:func:`embed_collection`), the main process computes the metrics from the gathered, de-duplicated
    embeddings and every process returns them; the numbers are those of a single process.
    """
    distributed = distributed and world_size() > 1
    image_size = eval_image_size(config, splits)
    if resize_ratio is None:  # given: a checkpoint's recorded eval view (``dmlkd eval``)
        resize_ratio = eval_resize_ratio(config, splits)
    ks = tuple(config.ks or splits.recall_ks)
    if splits.query is not None and splits.gallery is not None:
        query, query_labels = embed_collection(
            model, splits.query, config, image_size, resize_ratio, device, progress, distributed
        )
        gallery, gallery_labels = embed_collection(
            model, splits.gallery, config, image_size, resize_ratio, device, progress, distributed
        )
        sides = {"gallery": gallery, "gallery_labels": gallery_labels}
    else:
        query, query_labels = embed_collection(
            model, splits.test, config, image_size, resize_ratio, device, progress, distributed
        )
        sides = {}
    if distributed:
        return call_on_main(_metrics, query, query_labels, sides, config, ks)
    return _metrics(query, query_labels, sides, config, ks)


def _metrics(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    sides: dict[str, torch.Tensor],
    config: EvalConfig,
    ks: tuple[int, ...],
) -> dict[str, float]:

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
            {f"{config.second_metric}/{key}": value for key, value in extra.items() if key.startswith("recall@")}
        )
    return results


def run_eval_command(config: EvalCommandConfig) -> dict[str, Any]:
    """``dmlkd eval``: load the checkpoint, read the dataset, evaluate (shared by the processes of a launcher).

    Returns the metrics plus ``checkpoint`` (the folder evaluated: a run folder means its ``last/``),
    ``selected`` (``last``/``best`` for a run's checkpoint, else None), ``checkpoint_note`` (which checkpoint
    and why, e.g. ``last/ (final step)``), the ``epoch``/``step`` it was saved at, ``metric`` and ``dataset``.
    """

    device = init_processes(config.device).device if launched() else resolve_device(config.device)
    directory = resolve_checkpoint_dir(config.checkpoint)
    model, record = load_checkpoint(directory, device=device)
    splits, _bad = build_splits(config.data)
    evaluation, resize_ratio = _recorded_eval_view(config.eval, record)
    metrics = evaluate_model(model, splits, evaluation, device, distributed=launched(), resize_ratio=resize_ratio)
    saved = record.get("metrics") or {}
    return {
        **metrics,
        "checkpoint": str(directory),
        "selected": selection_of(directory, record),
        "checkpoint_note": selection_note(directory, record),
        "epoch": saved.get("epoch"),
        "step": saved.get("step"),
        "metric": config.eval.metric,
        "dataset": config.data.name,
    }


def _recorded_eval_view(evaluation: EvalConfig, record: dict[str, Any]) -> tuple[EvalConfig, float | None]:
    """``dmlkd eval`` evaluates at the checkpoint's recorded eval view unless ``--image-size`` says otherwise
    (with a warning when it differs); without a record, the dataset's defaults as before."""
    import dataclasses

    recorded = recorded_image_size(record)
    if evaluation.image_size is None and recorded is not None:
        evaluation = dataclasses.replace(evaluation, image_size=recorded)
    elif evaluation.image_size is not None and recorded is not None and evaluation.image_size != recorded:
        log.warning(
            "evaluating at %d px, but the checkpoint was trained and evaluated at %d px",
            evaluation.image_size,
            recorded,
        )
    return evaluation, recorded_resize_ratio(record)


def describe_selection(results: dict[str, Any]) -> str:
    """One line naming the evaluated checkpoint and how it was chosen (for ``dmlkd eval`` without --json)."""
    parts = [results["checkpoint_note"]] if results.get("selected") else []  # a plain folder is just its path
    if results.get("step") is not None:
        parts.append(f"saved at epoch {results['epoch']}, step {results['step']}")
    note = f" ({'; '.join(parts)})" if parts else ""
    return f"checkpoint {results['checkpoint']}{note}; {results['metric']} distance on {results['dataset']}"
