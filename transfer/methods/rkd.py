# RKD: W. Park, D. Kim, Y. Lu, M. Cho, "Relational Knowledge Distillation", CVPR 2019.
# Settings of the LabelRelaxation code (seed-spec §2.10–2.12).
"""Relational knowledge distillation (distance + angle terms), label-free."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dmlkd.data.batch import Batch
from dmlkd.models.outputs import ModelOutput
from dmlkd.registry import TRANSFER_METHODS
from dmlkd.transfer import functional
from dmlkd.transfer.base import TransferContext, TransferMethod, check_weight


def unit_teacher(embedding: Tensor) -> Tensor:
    """The teacher embedding as the reference feeds it to every embedding-transfer loss: L2-normalised
    (``--source-norm 1``; seed-spec §2.14 "L2 emb"), in float32, detached. Normalising an already
    normalised teacher changes it only by float rounding. PKT, DarkRank and the relaxed losses normalise
    inside; RKD's terms are not invariant to per-row norms and need this."""
    return F.normalize(embedding.detach().float(), p=2, dim=1)


@TRANSFER_METHODS.register("rkd")
class RKD(TransferMethod):
    """Relational KD: distance term + angle term, label-free.

    Returns ``{"rkd_distance": distance_weight · L_D, "rkd_angle": angle_weight · L_A}`` (reference 1 and 2);
    see :func:`dmlkd.transfer.functional.rkd_distance` and :func:`~dmlkd.transfer.functional.rkd_angle`.
    The teacher embedding is L2-normalised first, whatever the teacher's ``l2_norm`` (the reference's
    ``--source-norm 1``, seed-spec §1 item 4); the student's stays raw.
    The angle term costs O(N³) memory in the batch size N.
    """

    def __init__(self, context: TransferContext, distance_weight: float = 1.0, angle_weight: float = 2.0) -> None:
        super().__init__(context)
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
