# DarkRank: Y. Chen, N. Wang, Z. Zhang, "DarkRank: Accelerating Deep Metric Learning via Cross Sample
# Similarities Transfer", AAAI 2018.
# Settings of the LabelRelaxation code (seed-spec §2.10–2.12).
"""Hard DarkRank ranking transfer plus a batch-all triplet term on the student (uses labels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dmlkd.data.batch import Batch
from dmlkd.models.outputs import ModelOutput
from dmlkd.numerics import autocast_disabled, check_count, check_real, compute_dtype
from dmlkd.registry import TRANSFER_METHODS
from dmlkd.transfer import functional
from dmlkd.transfer.base import TransferContext, TransferMethod, check_weight


def batch_all_triplet(embeddings: Tensor, labels: Tensor, margin: float = 0.2) -> Tensor:
    """Triplet margin loss over every valid triplet of the batch, averaged over the non-zero ones.

    On x̂ = x/‖x‖ with Euclidean D (functional.pairwise_distances), for all (a, p, n) with a ≠ p,
    y_a = y_p and y_n ≠ y_a: ℓ_apn = [D_ap − D_an + margin]_+, and L = mean of the ℓ_apn > 0 (0 when none).
    This is what the reference computes with pytorch-metric-learning's ``TripletMarginLoss(margin=0.2)``
    (default ``AvgNonZeroReducer``) behind a ``TripletMarginMiner`` whose unknown type string mines every
    triplet with ℓ ≥ 0 (seed-spec §2.4, §2.10). The one difference: D clamps squared distances at 1e-12,
    so coincident rows are sqrt(1e-12) apart instead of 0. Memory is O(N³).

    Args:
        embeddings: (N, D) embeddings (normalised inside; gradients flow into them).
        labels: (N,) integer class labels.
        margin: the triplet margin.

    Returns:
        Scalar loss.
    """
    n = embeddings.shape[0]
    with autocast_disabled(embeddings.device):
        unit = F.normalize(embeddings.to(compute_dtype(embeddings)), p=2, dim=1)
        distances = functional.pairwise_distances(unit)
        with torch.no_grad():
            same = labels.unsqueeze(1) == labels.unsqueeze(0)
            positive = same & ~torch.eye(n, dtype=torch.bool, device=labels.device)
            valid = positive.unsqueeze(2) & (~same).unsqueeze(1)  # [a, p, n]
        violations = (distances.unsqueeze(2) - distances.unsqueeze(1) + margin).clamp(min=0.0)
        violations = torch.where(valid, violations, 0.0)
        active = (violations > 0).sum()
        return violations.sum() / active.clamp(min=1)


@TRANSFER_METHODS.register("darkrank")
class DarkRank(TransferMethod):
    """Hard DarkRank ranking term + a triplet term on the L2-normalised student (uses labels).

    Returns ``{"dark_rank": weight · L_rank, "triplet": triplet_weight · L_triplet}``; see
    :func:`dmlkd.transfer.functional.dark_rank` and :func:`batch_all_triplet`.

    Args:
        alpha: score scale α of ``a_ij = −α D_ij^β``.
        beta: distance exponent β.
        list_length: length of the teacher's ranked list per anchor.
        weight: weight of the ranking term.
        triplet_weight: weight of the triplet term.
        triplet_margin: margin of the triplet term.
    """

    uses_labels = True

    def __init__(
        self,
        context: TransferContext,
        alpha: float = 3.0,
        beta: float = 3.0,
        list_length: int = 4,
        weight: float = 1.0,
        triplet_weight: float = 1.0,
        triplet_margin: float = 0.2,
    ) -> None:
        super().__init__(context)
        self.alpha = check_real("alpha", alpha, 0.0)
        self.beta = check_real("beta", beta, 0.0)
        self.list_length = check_count("list_length", list_length)
        self.weight = check_weight("weight", weight)
        self.triplet_weight = check_weight("triplet_weight", triplet_weight)
        self.triplet_margin = check_weight("triplet_margin", triplet_margin)

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        rank = functional.dark_rank(
            student.embedding,
            teacher.embedding,
            alpha=self.alpha,
            beta=self.beta,
            list_length=self.list_length,
        )
        triplet = batch_all_triplet(student.embedding, batch.labels, margin=self.triplet_margin)
        return {"dark_rank": self.weight * rank, "triplet": self.triplet_weight * triplet}

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, list_length={self.list_length}, weight={self.weight}, "
            f"triplet_weight={self.triplet_weight}, triplet_margin={self.triplet_margin}"
        )
