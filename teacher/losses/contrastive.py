# Contrastive loss: R. Hadsell, S. Chopra, Y. LeCun, "Dimensionality Reduction by Learning an Invariant
# Mapping", CVPR 2006.
# Defaults are the reference settings of seed-spec §2.4 (the PyTorch-Metric-Learning wrappers of PA/LR).
"""Contrastive loss on Euclidean distances of L2-normalised embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmlkd.numerics import check_real
from dmlkd.registry import TEACHER_LOSSES
from dmlkd.teacher.losses.base import NormalizedPairLoss, euclidean_distances, pair_masks


def mean_of_nonzero(terms: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of ``terms`` over ``mask`` divided by how many of them are > 0 (0 when none is)."""
    kept = terms * mask
    return kept.sum() / (kept > 0).sum().clamp_min(1)


@TEACHER_LOSSES.register("contrastive")
class ContrastiveLoss(NormalizedPairLoss):
    """Contrastive loss on Euclidean distances d of L2-normalised embeddings.

    ``L = mean_{nonzero} relu(d_ij − m_pos) over positive pairs + mean_{nonzero} relu(m_neg − d_ik) over
    negative pairs``: each part is averaged over its pairs with a non-zero loss, as PML's ``ContrastiveLoss``
    with its default ``AvgNonZeroReducer`` (0 when no pair of that kind has a loss).

    Args:
        num_classes: number of training classes (>= 2; only used to check labels).
        embedding_dim: embedding width D.
        pos_margin: m_pos (reference 0).
        neg_margin: m_neg (reference 0.5).
    """

    name = "contrastive"

    def __init__(self, num_classes: int, embedding_dim: int, pos_margin: float = 0.0, neg_margin: float = 0.5) -> None:
        super().__init__(num_classes, embedding_dim)
        self.pos_margin = check_real("contrastive pos_margin", pos_margin, 0.0, 2.0, closed=True)
        self.neg_margin = check_real("contrastive neg_margin", neg_margin, 0.0, 2.0, closed=True)

    def extra_repr(self) -> str:
        return f"embedding_dim={self.embedding_dim}, pos_margin={self.pos_margin}, neg_margin={self.neg_margin}"

    def unit_loss(self, unit: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of the normalised batch; pairs at distance 0 pass no gradient."""
        dist = euclidean_distances(unit)
        positive, negative = pair_masks(labels)
        pos_part = mean_of_nonzero(F.relu(dist - self.pos_margin), positive)
        neg_part = mean_of_nonzero(F.relu(self.neg_margin - dist), negative)
        return pos_part + neg_part
