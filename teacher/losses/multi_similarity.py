# Multi-Similarity loss: X. Wang, X. Han, W. Huang, D. Dong, M. R. Scott, "Multi-Similarity Loss with General
# Pair Weighting for Deep Metric Learning", CVPR 2019 (arXiv:1904.06627).
# Defaults are the reference settings of seed-spec §2.4 (the PyTorch-Metric-Learning wrappers of PA/LR).
"""Multi-Similarity loss (with its pair miner) on L2-normalised embeddings."""

from __future__ import annotations

import math

import torch

from dmlkd.numerics import check_real, masked_softplus_logsumexp
from dmlkd.registry import TEACHER_LOSSES
from dmlkd.teacher.losses.base import NormalizedPairLoss, pair_masks


def multi_similarity_mining(
    similarity: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the (N, N) masks of the hard positive and hard negative pairs kept by the MS miner.

    A positive pair (i, j) is kept when ``S_ij − ε < max_k S_ik`` over i's negatives k, a negative pair (i, k)
    when ``S_ik + ε > min_j S_ij`` over i's positives j. An anchor without negatives keeps no positive, one
    without positives keeps no negative. ``similarity`` is read without gradient.
    """
    similarity = similarity.detach()
    hardest_negative = similarity.masked_fill(~negative, -math.inf).amax(dim=1, keepdim=True)
    hardest_positive = similarity.masked_fill(~positive, math.inf).amin(dim=1, keepdim=True)
    hard_positive = positive & (similarity - epsilon < hardest_negative)
    hard_negative = negative & (similarity + epsilon > hardest_positive)
    return hard_positive, hard_negative


@TEACHER_LOSSES.register("multi_similarity")
class MultiSimilarityLoss(NormalizedPairLoss):
    """Multi-Similarity loss on the cosine similarities S of L2-normalised embeddings, with its miner.

    ``L = mean_i [ 1/α log(1 + Σ_{j∈P_i} e^{−α(S_ij − λ)}) + 1/β log(1 + Σ_{k∈N_i} e^{β(S_ik − λ)}) ]``
    where P_i, N_i are the pairs kept by ``multi_similarity_mining``; the mean runs over all N anchors.

    Args:
        num_classes: number of training classes (>= 2; only used to check labels).
        embedding_dim: embedding width D.
        epsilon: ε of the miner (reference 0.1).
        scale_pos: α (reference 2).
        scale_neg: β (reference 50).
        threshold: λ (reference 0.5).
    """

    name = "multi_similarity"

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        epsilon: float = 0.1,
        scale_pos: float = 2.0,
        scale_neg: float = 50.0,
        threshold: float = 0.5,
    ) -> None:
        super().__init__(num_classes, embedding_dim)
        self.epsilon = check_real("multi_similarity epsilon", epsilon, 0.0, closed=True)
        self.scale_pos = check_real("multi_similarity scale_pos", scale_pos, 0.0)
        self.scale_neg = check_real("multi_similarity scale_neg", scale_neg, 0.0)
        self.threshold = check_real("multi_similarity threshold", threshold, -1.0, 1.0, closed=True)

    def extra_repr(self) -> str:
        return (
            f"embedding_dim={self.embedding_dim}, epsilon={self.epsilon}, scale_pos={self.scale_pos}, "
            f"scale_neg={self.scale_neg}, threshold={self.threshold}"
        )

    def unit_loss(self, unit: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        similarity = unit @ unit.T
        hard_positive, hard_negative = multi_similarity_mining(similarity, *pair_masks(labels), self.epsilon)
        shifted = similarity - self.threshold
        pos_terms = masked_softplus_logsumexp(-self.scale_pos * shifted, hard_positive, dim=1) / self.scale_pos
        neg_terms = masked_softplus_logsumexp(self.scale_neg * shifted, hard_negative, dim=1) / self.scale_neg
        return (pos_terms + neg_terms).mean()
