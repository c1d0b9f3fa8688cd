"""Input checks and batch helpers of the teacher losses (shared by the pair losses, margin and multi-similarity)."""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from dmlkd.errors import ConfigError, DataError
from dmlkd.numerics import autocast_disabled, check_count, check_real, compute_dtype, l2_normalize


def check_class_count(num_classes: int, embedding_dim: int) -> None:
    """Raise a one-line ConfigError unless ``num_classes >= 2`` and ``embedding_dim >= 1`` are integers."""
    check_count("num_classes", num_classes, 2)
    check_count("embedding_dim", embedding_dim, 1)


def check_batch(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int, embedding_dim: int) -> None:
    """Validate a (N, D) embedding batch and its (N,) integer labels in [0, num_classes).

    Raises:
        ConfigError: the embedding width differs from the loss's ``embedding_dim``.
        DataError: the batch is empty, the shapes disagree, or a label is outside ``0..num_classes-1``.
    """
    if embeddings.dim() != 2 or embeddings.shape[0] == 0:
        raise DataError(f"embeddings must be a non-empty (N, D) batch, got shape {tuple(embeddings.shape)}")
    if embeddings.shape[1] != embedding_dim:
        raise ConfigError(
            f"the model outputs {embeddings.shape[1]}-d embeddings but the loss has "
            f"embedding_dim={embedding_dim}; make them equal"
        )
    if labels.shape != embeddings.shape[:1]:
        raise DataError(f"labels must have shape ({embeddings.shape[0]},), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise DataError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    low, high = (int(v) for v in torch.aminmax(labels.detach()))  # one host sync per step
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise DataError(
            f"label {bad} is out of range for num_classes={num_classes} (valid labels are "
            f"0..{num_classes - 1}); check that num_classes matches the dataset's class count"
        )


def describe_batch(labels: list[int]) -> str:
    """Return e.g. ``"16 images: 3 classes with 4 images, 2 classes with 2 images"`` for an error message."""
    sizes = Counter(Counter(labels).values())
    parts = [
        f"{classes} class{'es' if classes > 1 else ''} with {size} image{'s' if size > 1 else ''}"
        for size, classes in sorted(sizes.items(), reverse=True)
    ]
    return f"{len(labels)} images: {', '.join(parts)}"


def check_pair_batch(labels: torch.Tensor, loss_name: str) -> list[int]:
    """Require a positive pair (two images of one class) and a negative pair; return the labels as a list.

    Raises:
        DataError: naming the batch composition and the ``--ipc`` setting that fixes it.
    """
    values = labels.detach().cpu().tolist()
    counts = Counter(values)
    if max(counts.values()) < 2:
        raise DataError(
            f"{loss_name} needs several images per class in a batch, got {describe_batch(values)}; "
            f"sample P classes x K images with --ipc K (K >= 2)"
        )
    if len(counts) < 2:
        raise DataError(
            f"{loss_name} needs at least two classes in a batch, got {describe_batch(values)}; "
            f"use a batch size of at least twice --ipc"
        )
    return values


def pair_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (positive, negative) (N, N) bool masks: same label off the diagonal, and different label."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def squared_distances(x: torch.Tensor) -> torch.Tensor:
    """(N, N) squared Euclidean distances ``‖x_i‖² + ‖x_j‖² − 2 x_i·x_j``, clamped at 0, diagonal exactly 0."""
    sq_norms = x.pow(2).sum(dim=1)
    dist = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)
    return dist.masked_fill(torch.eye(len(x), dtype=torch.bool, device=x.device), 0.0)


def euclidean_distances(x: torch.Tensor) -> torch.Tensor:
    """(N, N) Euclidean distances; entries at distance 0 (the diagonal) get value 0 and zero gradient."""
    sq = squared_distances(x)
    positive = sq > 0
    return torch.where(positive, sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt(), torch.zeros_like(sq))


def masked_logsumexp(values: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """``log Σ_{mask} exp(values)`` along ``dim``; slices with no masked-in entry give 0 and no gradient."""
    has_any = mask.any(dim=dim)
    keep = mask | ~has_any.unsqueeze(dim)
    log_sum = torch.logsumexp(values.masked_fill(~keep, -math.inf), dim=dim)
    return torch.where(has_any, log_sum, torch.zeros_like(log_sum))


class ClassifierLoss(nn.Module):
    """Softmax cross-entropy on the (N, C) logits of learnable class weights ``weight`` (C, D).

    A subclass creates ``weight`` and implements ``class_logits``; the constructor checks, the precision (at
    least float32 with autocast disabled, so fp16/bf16 backbones stay finite) and the loss live here.
    """

    lr_multiplier: float = 1.0  # the class weights train at the network's rate (PD train_elem.py: one optimizer)
    weight: nn.Parameter

    def __init__(self, num_classes: int, embedding_dim: int) -> None:
        super().__init__()
        check_class_count(num_classes, embedding_dim)
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}"

    def class_logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The (N, C) logits of ``embeddings``, already in the compute dtype of the embeddings and weights."""
        raise NotImplementedError

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the (N, C) logits of a batch (``labels`` place a margin on the targets where a loss has one)."""
        dtype = compute_dtype(embeddings, self.weight)
        with autocast_disabled(embeddings.device):
            return self.class_logits(embeddings.to(dtype), labels)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss of a batch.

        Args:
            embeddings: (N, D) raw embeddings; gradients flow into them and the class weights.
            labels: (N,) integer class indices in ``0..C-1``.
        """
        check_batch(embeddings, labels, self.num_classes, self.embedding_dim)
        logits = self.logits(embeddings, labels)
        with autocast_disabled(embeddings.device):
            return F.cross_entropy(logits, labels.long())


class PairLoss(nn.Module):
    """Shared constructor checks and batch validation of the parameter-free pair losses."""

    lr_multiplier: float = 1.0  # no parameters; kept for the trainer's contract
    name: str = "pair loss"

    def __init__(self, num_classes: int, embedding_dim: int) -> None:
        super().__init__()
        check_class_count(num_classes, embedding_dim)
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim

    def validated(self, embeddings: torch.Tensor, labels: torch.Tensor) -> list[int]:
        """Run ``check_batch`` and ``check_pair_batch`` (one host sync); return the labels as a list."""
        check_batch(embeddings, labels, self.num_classes, self.embedding_dim)
        return check_pair_batch(labels, self.name)


class NormalizedPairLoss(PairLoss):
    """A pair loss on the L2-normalised embeddings, computed in at least float32 with autocast disabled.

    A subclass implements ``unit_loss``; the batch checks, the precision and the normalisation live here.
    """

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss of a batch.

        Args:
            embeddings: (N, D) raw embeddings (normalised here); gradients flow into them.
            labels: (N,) integer class indices.
        """
        self.validated(embeddings, labels)
        with autocast_disabled(embeddings.device):
            return self.unit_loss(l2_normalize(embeddings.to(compute_dtype(embeddings))), labels)

    def unit_loss(self, unit: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The scalar loss of the (N, D) L2-normalised embeddings ``unit`` and their (N,) labels."""
        raise NotImplementedError


class MarginPairLoss(NormalizedPairLoss):
    """A pair loss whose one option is a margin m >= 0 (triplet, quadruplet; PaddlePaddle default 0.1).

    Args:
        num_classes: number of training classes (>= 2; only used to check labels).
        embedding_dim: embedding width D.
        margin: m (PaddlePaddle default 0.1).
    """

    def __init__(self, num_classes: int, embedding_dim: int, margin: float = 0.1) -> None:
        super().__init__(num_classes, embedding_dim)
        self.margin = check_real(f"{self.name} margin", margin, 0.0, closed=True)

    def extra_repr(self) -> str:
        return f"embedding_dim={self.embedding_dim}, margin={self.margin}"
