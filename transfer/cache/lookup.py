"""A loaded teacher cache: the teacher's outputs of a batch looked up by dataset index and replayed view.

``TeacherCache`` holds one file's tensors and checks that a training dataset replays exactly its views;
``RefreshingCache`` switches between generations of exact-replay caches as the run's replayed sets move on.
Building and loading the file is ``dmlkd.transfer.cache.teacher_cache``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from dmlkd.errors import ConfigError, DataError
from dmlkd.models.outputs import ModelOutput
from dmlkd.transfer.cache.spec import CacheSpec, sha256_json

logger = logging.getLogger(__name__)


class TeacherCache:
    """A loaded cache. ``embeddings`` ``(N, K, D)`` fp16; ``pooled`` ``(N, K, P)`` fp16 or None."""

    def __init__(
        self,
        embeddings: Tensor,
        pooled: Tensor | None,
        spec: CacheSpec,
        key: str,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if embeddings.dim() != 3 or embeddings.shape[1] != spec.num_sets:
            raise ValueError(f"cache embeddings must be (N, {spec.num_sets}, D), got {tuple(embeddings.shape)}")
        if pooled is not None and tuple(pooled.shape[:2]) != tuple(embeddings.shape[:2]):
            raise ValueError(f"cache pooled {tuple(pooled.shape)} does not fit embeddings {tuple(embeddings.shape)}")
        self.embeddings, self.pooled, self.spec, self.key = embeddings, pooled, spec, key
        self.metadata = dict(metadata or {})

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, Tensor], spec: CacheSpec, key: str, metadata: Mapping[str, str], device: torch.device
    ) -> TeacherCache:
        """The cache of a file's (or a build's) ``embeddings`` and optional ``pooled`` tensors, on ``device``."""
        pooled = tensors.get("pooled")
        return cls(tensors["embeddings"].to(device), None if pooled is None else pooled.to(device), spec, key, metadata)

    @property
    def num_images(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def device(self) -> torch.device:
        return self.embeddings.device

    def to(self, device: torch.device | str) -> TeacherCache:
        """The same cache with its tensors on ``device``."""
        pooled = None if self.pooled is None else self.pooled.to(device)
        return TeacherCache(self.embeddings.to(device), pooled, self.spec, self.key, self.metadata)

    def check_dataset(self, dataset: Any) -> None:
        """Raise ``ConfigError`` unless ``dataset`` (a ``TrainDataset``) replays exactly the cached views.

        Checks the image count and identifiers, and in cached mode the replay sets, image size, crop scale,
        ratio and flip probability (the trainer calls it on every use of a cache).
        """
        if len(dataset) != self.num_images:
            raise ConfigError(f"the teacher cache holds {self.num_images} images, the dataset {len(dataset)}")
        identifiers = getattr(getattr(dataset, "collection", None), "identifiers", None)
        recorded = self.metadata.get("identifiers_sha256")
        if identifiers is not None and recorded and sha256_json([str(name) for name in identifiers]) != recorded:
            raise ConfigError("the training dataset's images are not the images the teacher cache was built on")
        if self.spec.mode == "clean":
            return
        spec = self.spec
        replay = dataset.replay
        theirs = (
            None if replay is None else (replay.num_sets, replay.seed),
            dataset.image_size,
            tuple(dataset.scale),
            tuple(dataset.ratio),
            dataset.flip_p,
        )
        ours = ((spec.num_sets, spec.seed), spec.image_size, spec.scale, spec.ratio, spec.flip_p)
        if theirs != ours:
            raise ConfigError(
                f"the training dataset (replay, image_size, scale, ratio, flip_p) = {theirs} does not replay "
                f"the teacher cache's views {ours}; build TrainDataset with the cache spec's values"
            )

    def lookup(
        self, indices: Tensor, replay_k: Tensor | None = None, device: torch.device | str | None = None
    ) -> ModelOutput:
        """The cached teacher outputs of a batch, as if the teacher had run on it (no grad).

        Args:
            indices: ``(M,)`` dataset positions (``Batch.indices``, view-major).
            replay_k: ``(M,)`` replayed set of each view (from ``collate_views``); ignored in clean mode.
            device: where the result goes (default: the cache's device).

        Returns:
            ``ModelOutput`` with float32 ``embedding`` ``(M, D)`` and ``pooled`` ``(M, P)`` (None unless the
            cache was built ``with_pooled``); ``features`` is None.
        """
        indices = torch.as_tensor(indices).long()
        if self.spec.mode == "clean":
            replay_k = torch.zeros_like(indices)
        elif replay_k is None:
            raise ConfigError("an exact-replay teacher cache needs the replay_k of every view (from collate_views)")
        replay_k = torch.as_tensor(replay_k).long() - self.spec.first_set
        if replay_k.shape != indices.shape or indices.dim() != 1:
            raise ValueError(f"indices {tuple(indices.shape)} and replay_k {tuple(replay_k.shape)} must be (M,)")
        if indices.numel() and (int(replay_k.min()) < 0 or int(replay_k.max()) >= self.spec.num_sets):
            raise ConfigError(
                f"replay_k must lie in [{self.spec.first_set}, {self.spec.first_set + self.spec.num_sets}), got "
                f"[{int(replay_k.min()) + self.spec.first_set}, {int(replay_k.max()) + self.spec.first_set}] "
                f"(-1: the TrainDataset was built without replay={self.spec.replay})"
            )
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_images):
            raise DataError(f"indices must lie in [0, {self.num_images}) for this teacher cache")
        device = self.device if device is None else torch.device(device)
        rows, ks = indices.to(self.device), replay_k.to(self.device)
        pooled = None if self.pooled is None else self.pooled[rows, ks].to(device).float()
        embedding = self.embeddings[rows, ks].to(device).float()
        return ModelOutput(embedding=embedding, pooled=pooled)  # type: ignore[arg-type]


class RefreshingCache:
    """Generations of exact-replay caches: generation ``g`` holds the sets ``g*K .. (g+1)*K - 1`` of every image.

    ``load(g)`` returns generation ``g`` (built on first use, then kept on disk like any cache); only the current
    generation is held in memory. A batch replays one generation (``ReplaySpec.refresh_draws`` is a whole number
    of epochs), so every process switches at the same step.
    """

    def __init__(self, load: Any, first: TeacherCache) -> None:
        self.load, self.current, self.generation = load, first, 0
        self.spec, self.key = first.spec, first.key

    @property
    def num_images(self) -> int:
        return self.current.num_images

    def check_dataset(self, dataset: Any) -> None:
        self.current.check_dataset(dataset)

    def lookup(
        self, indices: Tensor, replay_k: Tensor | None = None, device: torch.device | str | None = None
    ) -> ModelOutput:
        if replay_k is None:
            raise ConfigError("an exact-replay teacher cache needs the replay_k of every view (from collate_views)")
        replay_k = torch.as_tensor(replay_k).long()
        if replay_k.numel():
            sets = self.spec.num_sets
            first, last = int(replay_k.min()) // sets, int(replay_k.max()) // sets
            if first != last:
                raise ConfigError(f"a batch replays two generations of cached views ({first} and {last})")
            if first != self.generation:
                where = self.current.device
                self.current = None  # type: ignore[assignment]  # free the old generation first
                self.current = self.load(first).to(where)
                self.generation = first
                logger.info("teacher cache: views of generation %d", first)
        return self.current.lookup(indices, replay_k, device)
