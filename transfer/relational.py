# RKD: W. Park, D. Kim, Y. Lu, M. Cho, "Relational Knowledge Distillation", CVPR 2019.
# PKT: N. Passalis, A. Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer",
# ECCV 2018.
# DarkRank: Y. Chen, N. Wang, Z. Zhang, "DarkRank: Accelerating Deep Metric Learning via Cross Sample
# Similarities Transfer", AAAI 2018. Settings of the LabelRelaxation code (seed-spec §2.10–2.12).
"""Embedding-transfer baselines that compare batch relations: RKD, PKT and hard DarkRank (+ triplet)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dmlkd.data.batch import Batch
from dmlkd.models.outputs import ModelOutput
from dmlkd.teacher.proxy_anchor import check_real, compute_dtype, full_precision
from dmlkd.transfer import functional
from dmlkd.transfer.base import ModelInfo, TransferMethod, check_count, check_weight

__all__ = ["PKT", "RKD", "DarkRank", "batch_all_triplet", "unit_teacher"]


def unit_teacher(embedding: Tensor) -> Tensor:
    """The teacher embedding as the reference feeds it to every embedding-transfer loss: L2-normalised
    (``--source-norm 1``; seed-spec §2.14 "L2 emb"), in float32, detached. Normalising an already
    normalised teacher changes it only by float rounding. PKT, DarkRank and the relaxed losses normalise
    inside; RKD's terms are not invariant to per-row norms and need this."""
    return F.normalize(embedding.detach().float(), p=2, dim=1)


class RKD(TransferMethod):
    """Relational KD: distance term + angle term, label-free.

    Returns ``{"rkd_distance": distance_weight · L_D, "rkd_angle": angle_weight · L_A}`` (reference 1 and 2);
    see :func:`dmlkd.transfer.functional.rkd_distance` and :func:`~dmlkd.transfer.functional.rkd_angle`.
    The teacher embedding is L2-normalised first, whatever the teacher's ``l2_norm`` (the reference's
    ``--source-norm 1``, seed-spec §1 item 4); the student's stays raw.
    The angle term costs O(N³) memory in the batch size N.
    """

    method_name = "rkd"

    def __init__(
        self,
        student: ModelInfo,
        teacher: ModelInfo,
        num_classes: int,
        num_train: int,
        num_views: int,
        distance_weight: float = 1.0,
        angle_weight: float = 2.0,
    ) -> None:
        super().__init__(student, teacher, num_classes, num_train, num_views)
        self.distance_weight = check_weight("distance_weight", distance_weight)
        self.angle_weight = check_weight("angle_weight", angle_weight)

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        teacher_embedding = unit_teacher(teacher.embedding)
        return {
            "rkd_distance": self.distance_weight * functional.rkd_distance(student.embedding, teacher_embedding),
            "rkd_angle": self.angle_weight * functional.rkd_angle(student.embedding, teacher_embedding),
        }

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"


class PKT(TransferMethod):
    """Probabilistic knowledge transfer, label-free: ``{"pkt": weight · L}`` (functional.pkt)."""

    method_name = "pkt"

    def __init__(
        self,
        student: ModelInfo,
        teacher: ModelInfo,
        num_classes: int,
        num_train: int,
        num_views: int,
        weight: float = 1.0,
    ) -> None:
        super().__init__(student, teacher, num_classes, num_train, num_views)
        self.weight = check_weight("weight", weight)

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        return {"pkt": self.weight * functional.pkt(student.embedding, teacher.embedding)}

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


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
    with full_precision(embeddings.device):
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

    method_name = "darkrank"
    uses_labels = True

    def __init__(
        self,
        student: ModelInfo,
        teacher: ModelInfo,
        num_classes: int,
        num_train: int,
        num_views: int,
        alpha: float = 3.0,
        beta: float = 3.0,
        list_length: int = 4,
        weight: float = 1.0,
        triplet_weight: float = 1.0,
        triplet_margin: float = 0.2,
    ) -> None:
        super().__init__(student, teacher, num_classes, num_train, num_views)
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
