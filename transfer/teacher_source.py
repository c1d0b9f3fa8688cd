"""The teacher of a transfer run: which teacher mode it trains with, and the teacher's output for a batch.

``online`` runs the frozen teacher on every batch; ``cached`` and ``clean`` replay its outputs from a teacher cache
(``dmlkd.transfer.cache``) built once for the run's views. ``resolve_mode`` picks the mode (``auto``, and the
methods whose feature maps no cache can hold); ``build_teacher_source`` loads or builds the cache the mode needs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmlkd.checkpoints.folder import is_timm_ref
from dmlkd.checkpoints.io import load_checkpoint, resolve_checkpoint_dir
from dmlkd.data.base import DatasetSplits
from dmlkd.data.batch import Batch
from dmlkd.data.training import augmentation
from dmlkd.data.transforms import ReplaySpec
from dmlkd.errors import ConfigError
from dmlkd.evaluation.run import eval_resize_ratio
from dmlkd.models.outputs import ModelOutput
from dmlkd.paths import cache_folder
from dmlkd.registry import TRANSFER_METHODS
from dmlkd.transfer.cache.lookup import RefreshingCache
from dmlkd.transfer.cache.spec import CacheSpec, teacher_digest
from dmlkd.transfer.cache.teacher_cache import load_or_build_cache
from dmlkd.transfer.config import TransferConfig

log = logging.getLogger(__name__)


AUTO_MODE = "online"  # what ``auto`` trains with: see docs/benchmarks.md, "Teacher cache diversity"


def resolve_mode(requested: str, method: str, for_cache: bool = False) -> str:
    """The teacher mode to use; feature-map methods cannot use a cache (the maps must match the view).

    ``auto`` trains ``online`` (the diversity benchmark did not show the K-view cache within 0.5 R@1 of the
    online teacher); for ``dmlkd cache build`` (``for_cache``) it means ``cached``."""
    method_cls = TRANSFER_METHODS.get(method)
    if requested == "auto":
        return "cached" if for_cache and method_cls.cacheable else AUTO_MODE
    if requested in ("cached", "clean") and not method_cls.cacheable:
        raise ConfigError(
            f"transfer method {method!r} needs the teacher's feature maps of the exact augmented "
            f"view, which a cache of embeddings cannot hold; use --teacher-mode online"
        )
    return requested


class TeacherSource:
    """The frozen teacher's output for a batch: an online forward pass, or a replay from a cache.

    It is deliberately not an ``nn.Module`` attribute of the trainable module: the teacher is never
    optimised, never saved with the student and never wrapped for DDP.
    """

    def __init__(
        self, mode: str, model: nn.Module | None = None, cache: Any = None, with_features: bool = False
    ) -> None:
        self.mode = mode
        self.model = model
        self.cache = cache
        self.with_features = with_features

    @torch.no_grad()
    def __call__(self, batch: Batch, replay_k: torch.Tensor) -> ModelOutput:
        if self.mode == "online":
            assert self.model is not None
            if next(self.model.parameters()).device != batch.images.device:
                self.model.to(batch.images.device)
            return self.model(batch.images, with_features=self.with_features)
        return self.cache.lookup(batch.indices, replay_k)


def load_teacher(ref: str) -> tuple[nn.Module, dict[str, Any], str]:
    """The frozen teacher (eval mode, no grad), its checkpoint record and a digest of its weights."""

    if not ref:
        raise ConfigError("no teacher given; pass --teacher RUN_OR_CHECKPOINT_FOLDER")
    teacher, record = load_checkpoint(ref)
    teacher.requires_grad_(False)
    digest = record["files"]["model.safetensors"]
    log.info("teacher %s (%s)", ref if is_timm_ref(ref) else resolve_checkpoint_dir(ref), digest[:12])
    return teacher, record, digest


def teacher_cache_folder(config: TransferConfig) -> Path:
    """Where the run's teacher caches live: ``teacher.cache_dir``, else ``teacher-outputs`` in the dmlkd cache."""
    if config.teacher.cache_dir:
        return Path(config.teacher.cache_dir).expanduser()

    return Path(cache_folder()) / "teacher-outputs"


_TEACHER_AUTOCAST = {"no": None, "fp16": "float16", "bf16": "bfloat16"}


def cache_spec_for(config: TransferConfig, splits: DatasetSplits, method_cls: Any, mode: str) -> Any:
    """The cache spec of a run: its views, and the teacher at the training precision (as the online teacher)."""

    train = config.train
    views = augmentation(train, splits)
    return CacheSpec(
        mode=mode,
        num_sets=config.teacher.cache_views if mode == "cached" else 1,
        seed=train.seed,
        image_size=views.image_size,
        scale=views.scale,
        ratio=views.ratio,
        flip_p=views.flip_p,
        eval_resize_ratio=eval_resize_ratio(config.eval, splits),
        with_pooled=bool(method_cls.needs_pooled),
        autocast=_TEACHER_AUTOCAST[train.mixed_precision],
    )


def build_teacher_source(
    config: TransferConfig,
    teacher: nn.Module,
    digest: str,
    splits: DatasetSplits,
    method_cls: Any,
    mode: str,
    device: torch.device,
    data: Any = None,
) -> TeacherSource:
    """The teacher of a run. With ``data`` (the run's ``TrainData``) its dataset is set to replay the cache's views
    (or none, online) and the cache is checked against it (on every use, loaded or built)."""
    if mode == "online":
        if data is not None:
            data.dataset.replay = None
        return TeacherSource("online", model=teacher.to(device), with_features=method_cls.needs_features)

    train = config.train
    spec = cache_spec_for(config, splits, method_cls, mode)
    cache_digest = teacher_digest(config.teacher.ref)  # weights *and* model config (preprocessing, l2_norm, ...)

    def load(generation: int) -> Any:
        cache = load_or_build_cache(
            teacher.to(device),  # the cache is built on the training device
            splits.train,
            spec.for_generation(generation) if generation else spec,
            teacher_cache_folder(config),
            teacher_digest=cache_digest,
            batch_size=config.teacher.cache_batch_size,
            num_workers=train.num_workers,
            device=device,
            progress=train.progress,
        )
        return cache.to(device)

    cache = load(0)
    refresh = config.teacher.cache_refresh_epochs if mode == "cached" else 0
    if data is not None:
        if mode == "cached":
            draws = refresh * int(data.batches_per_epoch) * train.batch_size
            data.dataset.replay = ReplaySpec(spec.num_sets, spec.seed, refresh_draws=draws)
        cache.check_dataset(data.dataset)
    if refresh:
        cache = RefreshingCache(load, cache)
    return TeacherSource(mode, cache=cache)
