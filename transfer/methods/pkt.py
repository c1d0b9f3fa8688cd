# PKT: N. Passalis, A. Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer",
# ECCV 2018.
# Settings of the LabelRelaxation code (seed-spec §2.10–2.12).
"""Probabilistic knowledge transfer, label-free."""

from __future__ import annotations

from torch import Tensor

from dmlkd.data.batch import Batch
from dmlkd.models.outputs import ModelOutput
from dmlkd.registry import TRANSFER_METHODS
from dmlkd.transfer import functional
from dmlkd.transfer.base import TransferContext, TransferMethod, check_weight


@TRANSFER_METHODS.register("pkt")
class PKT(TransferMethod):
    """Probabilistic knowledge transfer, label-free: ``{"pkt": weight · L}`` (functional.pkt)."""

    def __init__(self, context: TransferContext, weight: float = 1.0) -> None:
        super().__init__(context)
        self.weight = check_weight("weight", weight)

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        return {"pkt": self.weight * functional.pkt(student.embedding, teacher.embedding)}

    def extra_repr(self) -> str:
        return f"weight={self.weight}"
