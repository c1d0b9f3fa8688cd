"""Divide and conquer the embedding space (Sanakoyeu et al., CVPR 2019; TPAMI 2021 learnable masks).

Every ``mod_epoch`` epochs (at epochs 0, mod_epoch, 2 mod_epoch, ... before ``force_full_embedding_epoch``) the
train split is embedded with the current network (eval view, no gradient), L2-normalised and clustered by
k-means into K = ``nb_clusters`` clusters. New cluster ids are matched to the previous ones by maximal overlap
(Hungarian assignment, as the authors' code does) so that learner k keeps following "its" region. The
assignment is a buffer of the loss module, so it is saved with the resumable state: a run resumed in the middle
of an epoch keeps the assignment that epoch used (the buffer ``assignment_epoch`` tells which epoch computed it,
and reclustering only happens when it differs from the epoch that starts).

The D-dimensional embedding is split into K learners: learner k owns dimensions ``[k D/K, (k+1) D/K)`` (or, with
``masks``, uses ``embedding * relu(mask_k)`` with a learnable mask initialised to that indicator, plus the L1
penalty ``masking_lambda * mean |mask_k|``). A batch is drawn from one cluster (``ClusterBatchSampler``) and
only that cluster's learner (its own loss instance on D/K dimensions, or D with masks) sees it. From
``force_full_embedding_epoch`` on, the full embedding is trained on the whole data with the normal sampler and
one loss on D. Evaluation and checkpoints always use the full embedding.

Differences from the authors' code, on purpose: the cluster of each batch is drawn with probability
proportional to the cluster's size (the authors cycle through per-cluster loaders), so an epoch keeps the
normal number of batches; the TPAMI mask regulariser is the L1 term named above.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dmlkd.data.loading import make_train_loader
from dmlkd.data.samplers import _check_positive, _GlobalBatchSampler, _rng
from dmlkd.engine import distributed as dist_utils
from dmlkd.errors import ConfigError, DataError
from dmlkd.evaluation.kmeans import kmeans
from dmlkd.evaluation.run import embed_collection, eval_image_size
from dmlkd.teacher.config import DivideConfig, TeacherConfig
from dmlkd.teacher.module import TeacherModule, build_criterion

log = logging.getLogger(__name__)

_CLUSTER = 3  # random stream tag, distinct from the tags of dmlkd.data.samplers


def check_divisible(embedding_dim: int, nb_clusters: int) -> int:
    """The learners' width ``D / K``; a ``ConfigError`` when ``D`` is not a multiple of ``K``."""
    if embedding_dim % nb_clusters:
        raise ConfigError(
            f"embedding dimension {embedding_dim} is not divisible by --nb-clusters {nb_clusters}; "
            f"use a K that divides {embedding_dim}"
        )
    return embedding_dim // nb_clusters


def slice_indicator(nb_clusters: int, embedding_dim: int) -> Tensor:
    """``(K, D)`` float 0/1 rows: row k is 1 on learner k's dimensions ``[k D/K, (k+1) D/K)``."""
    width = check_divisible(embedding_dim, nb_clusters)
    return torch.repeat_interleave(torch.eye(nb_clusters), width, dim=1)


def align_clusters(previous: np.ndarray, current: np.ndarray, nb_clusters: int) -> np.ndarray:
    """Rename the clusters of ``current`` so that each overlaps the same-numbered cluster of ``previous`` most.

    Both are ``(N,)`` ids in ``[0, K)``; the renaming is the maximum-overlap one-to-one matching.
    """
    from scipy.optimize import linear_sum_assignment

    overlap = np.zeros((nb_clusters, nb_clusters), dtype=np.int64)
    np.add.at(overlap, (current, previous), 1)
    new_ids, old_ids = linear_sum_assignment(-overlap)
    rename = np.empty(nb_clusters, dtype=np.int64)
    rename[new_ids] = old_ids
    return rename[current]


class ClusterBatchSampler(_GlobalBatchSampler):
    """P classes x K images per batch, all from one cluster (same contract as ``dmlkd.data.samplers``).

    Only classes with at least two images inside a cluster are drawn from it, and only clusters with at least
    two such classes are drawn. Batch ``b`` of epoch ``e`` picks its cluster with probability proportional to
    the number of drawable images in each cluster, then ``min(P, classes in the cluster)`` distinct classes
    and, with replacement, the images of each class (K each, or ``batch_size`` spread evenly over the classes
    when a cluster holds fewer than P); everything is drawn from a generator keyed by ``(seed, e, b)``, so a
    batch depends on the seed, the epoch and the current assignment only. An epoch has ``num_batches``
    batches whatever the clusters.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        batch_size: int,
        images_per_class: int,
        num_batches: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(batch_size, seed, rank, world_size)
        _check_positive(images_per_class=images_per_class, num_batches=num_batches)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.images_per_class = images_per_class
        self.classes_per_batch = max(1, batch_size // images_per_class)
        self.num_batches = num_batches
        self.assignment = np.zeros(len(self.labels), dtype=np.int64)
        self._clusters: list[list[np.ndarray]] = []
        self._weights = np.zeros(0)
        self.set_assignment(self.assignment)

    def __len__(self) -> int:
        return self.num_batches

    def set_assignment(self, assignment: np.ndarray | Tensor) -> None:
        """Use ``assignment`` (``(N,)`` cluster ids) from now on; raises when no cluster can form a batch."""
        assignment = np.asarray(assignment, dtype=np.int64)
        if assignment.shape != self.labels.shape:
            raise ValueError(f"assignment has shape {assignment.shape}, expected {self.labels.shape}")
        self.assignment = assignment
        self._clusters = []
        for cluster in range(int(assignment.max()) + 1):
            positions = np.flatnonzero(assignment == cluster)
            classes, inverse, counts = np.unique(self.labels[positions], return_inverse=True, return_counts=True)
            members = [positions[inverse == i] for i in range(len(classes)) if counts[i] >= 2]
            self._clusters.append(members if len(members) >= 2 else [])
        self._weights = np.array([sum(len(m) for m in members) for members in self._clusters], dtype=np.float64)
        if self._weights.sum() == 0:
            raise DataError(
                "no cluster holds two classes with two images each, so no one-cluster batch can be drawn; "
                "use a smaller --nb-clusters"
            )

    def batch_cluster(self, batch: int) -> int:
        """The cluster that batch ``batch`` of the current epoch is drawn from."""
        return int(self._draw(batch)[0])

    def global_batch(self, batch: int) -> np.ndarray:
        return self._draw(batch)[1]

    def _draw(self, batch: int) -> tuple[int, np.ndarray]:
        rng = _rng(self.seed, self.epoch, batch, _CLUSTER)
        cluster = int(rng.choice(len(self._weights), p=self._weights / self._weights.sum()))
        members = self._clusters[cluster]
        count = min(self.classes_per_batch, len(members))
        chosen = rng.choice(len(members), count, replace=False)
        sizes = np.full(count, self.batch_size // count)
        sizes[: self.batch_size % count] += 1
        picks = [members[c][rng.integers(0, len(members[c]), size)] for c, size in zip(chosen, sizes)]
        return cluster, np.concatenate(picks)


class DivideCriterion(nn.Module):
    """K learner losses on sub-embeddings, one full loss, and the cluster assignment (all saved with the loss).

    Args:
        learners: K losses ``forward(embeddings, labels) -> scalar`` on D/K dimensions (D with masks).
        full: the loss on all D dimensions (full-embedding phase).
        embedding_dim: D.
        num_train: number of training images N (size of the ``assignment`` buffer).
        masks: learnable masks (TPAMI) instead of fixed slices.
        masking_lambda: weight of the L1 mask penalty.
    """

    def __init__(
        self,
        learners: Sequence[nn.Module],
        full: nn.Module,
        embedding_dim: int,
        num_train: int,
        masks: bool = False,
        masking_lambda: float = 0.01,
    ) -> None:
        super().__init__()
        self.nb_clusters = len(learners)
        self.width = check_divisible(embedding_dim, self.nb_clusters)
        self.learners = nn.ModuleList(learners)
        self.full = full
        self.masking_lambda = float(masking_lambda)
        self.lr_multiplier = getattr(full, "lr_multiplier", 1.0)
        indicator = slice_indicator(self.nb_clusters, embedding_dim)
        self.masks = nn.ParameterList([nn.Parameter(row.clone()) for row in indicator]) if masks else None
        self.register_buffer("assignment", torch.zeros(num_train, dtype=torch.long))
        self.register_buffer("assignment_epoch", torch.full((), -1, dtype=torch.long))
        self.register_buffer("full_phase", torch.zeros((), dtype=torch.bool))

    def loss_parameters(self) -> list[nn.Parameter]:
        """The losses' own parameters (proxies, margins): everything but the masks."""
        return [*self.learners.parameters(), *self.full.parameters()]

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Forward the epoch to every epoch-dependent loss (IAA)."""
        for loss in (*self.learners, self.full):
            if hasattr(loss, "set_epoch"):
                loss.set_epoch(epoch, epochs)

    def learner_input(self, embedding: Tensor, learner: int) -> Tensor:
        """Learner ``learner``'s view of ``(B, D)`` embeddings: ``(B, D/K)`` slice or ``(B, D)`` masked rows."""
        if self.masks is None:
            return embedding[:, learner * self.width : (learner + 1) * self.width]
        return embedding * F.relu(self.masks[learner]).to(embedding.dtype)

    def batch_learner(self, indices: Tensor) -> int:
        """The cluster of a batch from its samples' dataset positions; all must share it."""
        clusters = self.assignment[indices]
        first = int(clusters[0])
        if not bool((clusters == first).all()):
            raise RuntimeError(f"a divide-and-conquer batch mixes clusters {clusters.unique().tolist()}")
        return first

    def forward(self, embedding: Tensor, labels: Tensor, indices: Tensor) -> dict[str, Tensor]:
        """Named loss terms of a batch; ``"loss"`` is the total to minimise.

        Args:
            embedding: ``(B, D)`` embeddings (with gradient).
            labels: ``(B,)`` class ids.
            indices: ``(B,)`` dataset positions of the rows (they select the cluster and so the learner).
        """
        if bool(self.full_phase):
            loss = self.full(embedding, labels)
            return {"loss": loss, "full": loss.detach()}
        learner = self.batch_learner(indices)
        loss = self.learners[learner](self.learner_input(embedding, learner), labels)
        terms = {f"learner_{learner}": loss.detach()}
        if self.masks is not None:
            penalty = self.masking_lambda * self.masks[learner].abs().mean()
            loss = loss + penalty
            terms["mask_l1"] = penalty.detach()
        if dist_utils.world_size() > 1:  # DDP needs every parameter in the graph; these add zero gradients
            loss = loss + sum(p.sum() * 0 for p in self.parameters() if p.requires_grad)
        return {"loss": loss, **terms}


class DivideTeacherModule(TeacherModule):
    """``TeacherModule`` whose loss also gets the batch's dataset positions (to pick the learner)."""

    def forward(self, batch: Any, replay_k: Tensor | None = None) -> dict[str, Tensor]:
        output = self.model(batch.images)
        embedding = dist_utils.gather_view_major(output.embedding, self.views, with_grad=True)
        labels = dist_utils.gather_view_major(batch.labels, self.views)
        indices = dist_utils.gather_view_major(batch.indices, self.views)
        terms = self.criterion(embedding, labels, indices)
        return {**terms, self.loss_name: terms["loss"].detach()}


def cluster_embeddings(
    embeddings: Tensor, nb_clusters: int, seed: int, previous: np.ndarray | None = None
) -> np.ndarray:
    """k-means ids ``(N,)`` of L2-normalised ``(N, D)`` embeddings, renamed to match ``previous`` if given."""

    points = F.normalize(embeddings.float(), dim=1)
    assignment = kmeans(points, nb_clusters, seed=seed, backend="torch").cpu().numpy().astype(np.int64)
    if previous is not None:
        assignment = align_clusters(previous, assignment, nb_clusters)
    return assignment


class DivideSchedule:
    """The loader factory of a divide-and-conquer run: reclusters or switches phase when an epoch starts.

    The loop calls it as ``loader_factory(epoch, start_batch)`` at the start of every epoch, resumed ones
    included, before the epoch's first batch.
    """

    def __init__(
        self,
        config: TeacherConfig,
        criterion: DivideCriterion,
        model: nn.Module,
        splits: Any,
        normal_factory: Callable[[int, int], Iterable[Any]],
        sampler: ClusterBatchSampler,
        loader: Iterable[Any],
    ) -> None:
        self.divide, self.train, self.eval_config = config.divide, config.train, config.eval
        self.criterion, self.model, self.splits = criterion, model, splits
        self.normal_factory, self.sampler, self.loader = normal_factory, sampler, loader

    def full_embedding(self, epoch: int) -> bool:
        force = self.divide.force_full_embedding_epoch
        return self.divide.nb_clusters == 1 or (force is not None and epoch >= force)

    def needs_clustering(self, epoch: int) -> bool:
        """At a division epoch not yet clustered (a resumed epoch keeps its saved assignment), or never yet."""
        done = int(self.criterion.assignment_epoch)
        return done < 0 or (epoch % self.divide.mod_epoch == 0 and done != epoch)

    def __call__(self, epoch: int, start_batch: int) -> Iterable[Any]:
        self.criterion.set_epoch(epoch, self.train.epochs)
        full = self.full_embedding(epoch)
        self.criterion.full_phase.fill_(full)
        if full:
            return self.normal_factory(epoch, start_batch)
        if self.needs_clustering(epoch):
            self.recluster(epoch)
        self.sampler.set_assignment(self.criterion.assignment.cpu().numpy())
        self.sampler.set_epoch(epoch, start_batch)
        return self.loader

    @torch.no_grad()
    def recluster(self, epoch: int) -> None:
        """Embed the train split with the current network, cluster it and store the assignment."""

        device = next(self.model.parameters()).device
        embeddings, _ = embed_collection(
            self.model,
            self.splits.train,
            self.eval_config,
            eval_image_size(self.eval_config, self.splits),
            self.splits.defaults.get("eval_resize_ratio", 256 / 224),
            device,
            progress=self.train.progress,
            distributed=dist_utils.world_size() > 1,
        )
        previous = None if int(self.criterion.assignment_epoch) < 0 else self.criterion.assignment.cpu().numpy()
        seed = self.train.seed * 100_003 + epoch
        assignment = dist_utils.call_on_main(
            cluster_embeddings, embeddings.to(device), self.divide.nb_clusters, seed, previous
        )
        self.criterion.assignment.copy_(torch.from_numpy(assignment))
        self.criterion.assignment_epoch.fill_(epoch)
        sizes = np.bincount(assignment, minlength=self.divide.nb_clusters).tolist()
        log.info("epoch %d: divided the %d training images into clusters of sizes %s", epoch, len(assignment), sizes)


def build_divide(
    config: TeacherConfig, model: nn.Module, splits: Any, data: Any, rank: int = 0, world_size: int = 1
) -> tuple[DivideTeacherModule, list[tuple[str, list[nn.Parameter], float]], DivideSchedule]:
    """The trainable module, its parameter groups and the loader factory of a divide-and-conquer run.

    ``data`` is the run's ``TrainData`` (its sampler and loader serve the full-embedding phase).
    """

    divide: DivideConfig = config.divide
    dim, k = config.model.embedding_dim, divide.nb_clusters
    width = check_divisible(dim, k)
    if config.train.ipc is None:
        raise ConfigError(f"--nb-clusters {k} draws P classes x K images from one cluster; pass --ipc K")
    if k > len(splits.train):
        raise ConfigError(f"--nb-clusters {k} exceeds the {len(splits.train)} training images; use fewer")
    learners = [build_criterion(config, data.num_classes, dim if divide.masks else width) for _ in range(k)]
    criterion = DivideCriterion(
        learners,
        build_criterion(config, data.num_classes),
        dim,
        len(splits.train),
        masks=divide.masks,
        masking_lambda=divide.masking_lambda,
    )
    module = DivideTeacherModule(model, criterion, config.loss.name, views=config.train.views)
    sampler = ClusterBatchSampler(
        splits.train.labels,
        config.train.batch_size,
        config.train.ipc,
        num_batches=data.batches_per_epoch,
        seed=config.train.seed,
        rank=rank,
        world_size=world_size,
    )
    loader = make_train_loader(data.dataset, sampler, num_workers=config.train.num_workers)
    schedule = DivideSchedule(config, criterion, model, splits, data.loader_factory, sampler, loader)
    return module, divide_param_groups(module, config), schedule


def divide_param_groups(
    module: DivideTeacherModule, config: TeacherConfig
) -> list[tuple[str, list[nn.Parameter], float]]:
    """Backbone, head and loss groups as usual, plus the masks at ``lr x mask_lr_mult``."""
    model, criterion, optim = module.model, module.criterion, config.optim
    loss_mult = optim.loss_lr_mult if optim.loss_lr_mult is not None else criterion.lr_multiplier
    groups = [
        ("backbone", list(model.backbone.parameters()), optim.backbone_lr_mult),
        ("head", list(model.embedding.parameters()), optim.head_lr_mult),
        ("loss", criterion.loss_parameters(), loss_mult),
    ]
    if criterion.masks is not None:
        groups.append(("masks", list(criterion.masks), config.divide.mask_lr_mult))
    return groups
