# Pair-based fine-tuning losses of PaddlePaddle/models PaddleCV/metric_learning (seed-spec §2.13):
# - triplet: F. Schroff, D. Kalenichenko, J. Philbin, "FaceNet: A Unified Embedding for Face Recognition and
#   Clustering", CVPR 2015 (arXiv:1503.03832).
# - quadruplet: Q. Xiao, H. Luo, C. Zhang, "Margin Sample Mining Loss: A Deep Learning Based Method for Person
#   Re-identification", 2017 (arXiv:1710.00478).
# - eml: C. Huang, C. C. Loy, X. Tang, "Local Similarity-Aware Deep Feature Embedding", NIPS 2016, and the
#   ensemble metric surrogate of "Large Scale Strongly Supervised Ensemble Metric Learning", 2014.
# - npairs: K. Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss Objective", NIPS 2016.
"""Triplet, quadruplet, EML and N-pairs losses on class-grouped batches, plus the batch helpers they share.

None of these losses has trainable parameters. They read positives and negatives from the labels, so they
work on any batch order; on PaddlePaddle's class-ordered layout (``samples_each_class`` consecutive rows per
class, our P x K sampler with ``--ipc K``) they give PaddlePaddle's values.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from dmlkd.errors import DataError
from dmlkd.teacher.proxy_anchor import (
    check_batch,
    check_class_count,
    check_real,
    compute_dtype,
    full_precision,
    l2_normalize,
)

# ---------------------------------------------------------------------------------------------------------
# Helpers shared by the pair losses (also used by ms_contrastive.py and margin.py).


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


class PairLoss(nn.Module):
    """Shared constructor checks and batch validation of the parameter-free pair losses."""

    lr_multiplier: float = 1.0  # no parameters; kept for the trainer's contract
    name: str = "pair loss"

    def __init__(self, num_classes: int, embedding_size: int) -> None:
        super().__init__()
        check_class_count(num_classes, embedding_size)
        self.num_classes = num_classes
        self.embedding_size = embedding_size

    def validated(self, embeddings: torch.Tensor, labels: torch.Tensor) -> list[int]:
        """Run ``check_batch`` and ``check_pair_batch`` (one host sync); return the labels as a list."""
        check_batch(embeddings, labels, self.num_classes, self.embedding_size)
        return check_pair_batch(labels, self.name)


# ---------------------------------------------------------------------------------------------------------


class TripletLoss(PairLoss):
    """Batch-all triplet loss on squared distances of L2-normalised embeddings.

    ``L = mean over triplets (a, p, n) of relu(d(a, p) + m − d(a, n))`` with d the squared Euclidean distance.

    Mining rule: every positive pair {i, j} (i < j, same class) taken once, with the earlier row as the
    anchor, against every negative n of the anchor; the mean runs over all these triplets, zero-loss ones
    included (as PaddlePaddle averages its triplets). On a batch that is one PaddlePaddle triplet (rows a, p,
    n) this is exactly PaddlePaddle's ``relu(d_ap + m − d_an)``. PaddlePaddle's reader draws triplets with a
    uniformly random class for (a, p) and a uniformly random other class for n; on a P x K batch the triplets
    above have the same distribution, so the expected loss matches PaddlePaddle's.

    Args:
        num_classes: number of training classes (>= 2; only used to check labels).
        embedding_size: embedding width D.
        margin: m (PaddlePaddle default 0.1).
    """

    name = "triplet"

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.1) -> None:
        super().__init__(num_classes, embedding_size)
        self.margin = check_real("triplet margin", margin, 0.0, closed=True)

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, margin={self.margin}"

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss of a batch.

        Args:
            embeddings: (N, D) raw embeddings (normalised here); gradients flow into them.
            labels: (N,) integer class indices.
        """
        self.validated(embeddings, labels)
        with full_precision(embeddings.device):
            dist = squared_distances(l2_normalize(embeddings.to(compute_dtype(embeddings))))
            positive, negative = pair_masks(labels)
            anchor, other = torch.triu(positive, diagonal=1).nonzero(as_tuple=True)  # (M,) pairs, anchor < other
            terms = F.relu(dist[anchor, other][:, None] + self.margin - dist[anchor])  # (M, N) over negatives
            valid = negative[anchor]
            return (terms * valid).sum() / valid.sum()


class QuadrupletLoss(PairLoss):
    """Batch-global hardest pair loss: ``relu(max positive d − min negative d + m)``.

    d is the squared Euclidean distance between L2-normalised embeddings; the maximum runs over every positive
    pair of the batch and the minimum over every negative pair (PaddlePaddle's ``QuadrupletLoss``).

    Args:
        num_classes: number of training classes (>= 2; only used to check labels).
        embedding_size: embedding width D.
        margin: m (PaddlePaddle default 0.1).
    """

    name = "quadruplet"

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.1) -> None:
        super().__init__(num_classes, embedding_size)
        self.margin = check_real("quadruplet margin", margin, 0.0, closed=True)

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, margin={self.margin}"

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss; gradients reach only the rows of the two extreme pairs."""
        self.validated(embeddings, labels)
        with full_precision(embeddings.device):
            dist = squared_distances(l2_normalize(embeddings.to(compute_dtype(embeddings))))
            positive, negative = pair_masks(labels)
            hardest_positive = dist.masked_fill(~positive, -math.inf).amax()
            hardest_negative = dist.masked_fill(~negative, math.inf).amin()
            return F.relu(hardest_positive - hardest_negative + self.margin)


class EMLLoss(PairLoss):
    """Ensemble-metric-learning surrogate on squared distances of the raw (unnormalised) embeddings.

    Per anchor, with positives P (other rows of its class), negatives N, p* = max_P d and n* = min_N d:
    ``θ = mean_P e^{d_p − p*} · mean_N e^{−(d_n − n*)}``, ``b = p* − n*`` and
    ``loss = log(1 + β θ e^b) / log(1 + β)``, or ``(log θ + b + log β) / log(1 + β)`` when b > threshold.
    The batch loss is the mean over anchors. Both forms are evaluated through
    ``z = log β + log θ + b = log β + LSE_P(d) − log|P| + LSE_N(−d) − log|N|`` (log(1 + e^z) and z), so nothing
    overflows. PaddlePaddle's "stable" form adds ``f_lin(20) − f(20)`` (|·| < 1e-12) below the threshold;
    it is left out.

    Args:
        num_classes: number of training classes (>= 2; only used to check labels).
        embedding_size: embedding width D.
        beta: β (PaddlePaddle: 1e5).
        threshold: b above which the linearised form is used (PaddlePaddle: 20).
    """

    name = "eml"

    def __init__(self, num_classes: int, embedding_size: int, beta: float = 1e5, threshold: float = 20.0) -> None:
        super().__init__(num_classes, embedding_size)
        self.beta = check_real("eml beta", beta, 0.0)
        self.threshold = check_real("eml threshold", threshold, -math.inf)

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, beta={self.beta:g}, threshold={self.threshold}"

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the mean over anchors that have a positive (every anchor of a P x K batch with K >= 2)."""
        self.validated(embeddings, labels)
        with full_precision(embeddings.device):
            dist = squared_distances(embeddings.to(compute_dtype(embeddings)))
            positive, negative = pair_masks(labels)
            anchors = positive.any(dim=1) & negative.any(dim=1)
            hardest_positive = dist.masked_fill(~positive, -math.inf).amax(dim=1)
            hardest_negative = dist.masked_fill(~negative, math.inf).amin(dim=1)
            bias = torch.where(anchors, hardest_positive - hardest_negative, torch.zeros_like(hardest_positive))
            z = (
                math.log(self.beta)
                + masked_logsumexp(dist, positive, dim=1)
                - positive.sum(dim=1).clamp_min(1).to(dist.dtype).log()
                + masked_logsumexp(-dist, negative, dim=1)
                - negative.sum(dim=1).clamp_min(1).to(dist.dtype).log()
            )
            softplus = torch.logaddexp(z, torch.zeros_like(z))  # exact log(1 + e^z); F.softplus cuts off at z > 20
            per_anchor = torch.where(bias > self.threshold, z, softplus) / math.log1p(self.beta)
            return (per_anchor * anchors).sum() / anchors.sum()


class NPairsLoss(PairLoss):
    """Multi-class N-pair loss on raw embeddings, with PaddlePaddle's L2 regulariser.

    The batch must be N/2 classes x 2 images in consecutive rows (``--ipc 2``): rows 0, 2, 4, ... are the
    anchors, rows 1, 3, 5, ... their positives. Logits are ``anchors · positivesᵀ`` (N/2, N/2); targets are
    PaddlePaddle's soft label-equality rows (the identity here, since every class appears once on each side);
    the loss is the mean cross-entropy plus ``0.5 · λ · mean_i ‖x_i‖²`` over all N rows.

    Args:
        num_classes: number of training classes (>= 2; only used to check labels).
        embedding_size: embedding width D.
        reg_lambda: λ (PaddlePaddle default 0.01).
    """

    name = "npairs"

    def __init__(self, num_classes: int, embedding_size: int, reg_lambda: float = 0.01) -> None:
        super().__init__(num_classes, embedding_size)
        self.reg_lambda = check_real("npairs reg_lambda", reg_lambda, 0.0, closed=True)

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, reg_lambda={self.reg_lambda}"

    def validated(self, embeddings: torch.Tensor, labels: torch.Tensor) -> list[int]:
        values = super().validated(embeddings, labels)
        pairs_ok = len(values) % 2 == 0 and values[0::2] == values[1::2]
        if not (pairs_ok and all(count == 2 for count in Counter(values).values())):
            raise DataError(
                f"npairs needs every class of a batch exactly twice, in consecutive rows (samples_each_class=2), "
                f"got {describe_batch(values)}; train with --ipc 2"
            )
        return values

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss; gradients flow into all rows (cross-entropy and regulariser)."""
        self.validated(embeddings, labels)
        with full_precision(embeddings.device):
            x = embeddings.to(compute_dtype(embeddings))
            anchors, positives = x[0::2], x[1::2]
            targets = (labels[0::2, None] == labels[None, 1::2]).to(x.dtype)
            targets = targets / targets.sum(dim=1, keepdim=True)
            cross_entropy = F.cross_entropy(anchors @ positives.T, targets)
            return cross_entropy + 0.5 * self.reg_lambda * x.pow(2).sum(dim=1).mean()
