# Relaxed losses: S. Kim, D. Kim, M. Cho, S. Kwak, "Embedding Transfer with Label Relaxation for Improved
# Metric Learning", CVPR 2021 (arXiv:2103.14908). Math in dmlkd.transfer.functional (seed-spec §2.5–2.6).
"""Relaxed contrastive transfer: label-free, embedding only."""

from __future__ import annotations

from torch import Tensor

from dmlkd.data.batch import Batch
from dmlkd.models.outputs import ModelOutput
from dmlkd.numerics import check_real
from dmlkd.registry import TRANSFER_METHODS
from dmlkd.transfer import functional
from dmlkd.transfer.base import TransferContext, TransferMethod, check_weight


@TRANSFER_METHODS.register("relaxed_contrastive")
class RelaxedContrastive(TransferMethod):
    """Relaxed contrastive loss on the raw student embedding, relaxed labels from the teacher's directions.

    Returns ``{"relaxed_contrastive": weight · L}``; see
    :func:`dmlkd.transfer.functional.relaxed_contrastive`.

    Args:
        sigma: width σ of the Gaussian relaxed label (reference ``--sigma`` 1).
        delta: margin δ on the row-mean-normalised distances (reference ``--delta`` 1).
        weight: weight of the term.
    """

    def __init__(self, context: TransferContext, sigma: float = 1.0, delta: float = 1.0, weight: float = 1.0) -> None:
        super().__init__(context)
        self.sigma = check_real("sigma", sigma, 0.0)
        self.delta = check_real("delta", delta, 0.0)
        self.weight = check_weight("weight", weight)

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        loss = functional.relaxed_contrastive(student.embedding, teacher.embedding, sigma=self.sigma, delta=self.delta)
        return {"relaxed_contrastive": self.weight * loss}

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, delta={self.delta}, weight={self.weight}"
