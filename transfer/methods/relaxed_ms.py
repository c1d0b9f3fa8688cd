# Relaxed losses: S. Kim, D. Kim, M. Cho, S. Kwak, "Embedding Transfer with Label Relaxation for Improved
# Metric Learning", CVPR 2021 (arXiv:2103.14908). Math in dmlkd.transfer.functional (seed-spec §2.5–2.6).
"""Relaxed multi-similarity transfer: label-free, embedding only."""

from __future__ import annotations

from torch import Tensor

from dmlkd.data.batch import Batch
from dmlkd.models.outputs import ModelOutput
from dmlkd.numerics import check_real
from dmlkd.registry import TRANSFER_METHODS
from dmlkd.transfer import functional
from dmlkd.transfer.base import TransferContext, TransferMethod, check_weight


@TRANSFER_METHODS.register("relaxed_ms")
class RelaxedMS(TransferMethod):
    """Relaxed multi-similarity loss (the reference's broken ``Relaxed_MS``, working and vectorised).

    The views of one image are forced to be positives (w = 1); which rows are views of one image follows from
    the batch layout: ``context.num_views`` view-major blocks (row ``i + v·B`` is view ``v`` of image ``i``).
    Returns ``{"relaxed_ms": weight · L}``; see :func:`dmlkd.transfer.functional.relaxed_ms`.

    Args:
        sigma: width σ of the Gaussian relaxed label.
        delta: margin δ of the push term.
        alpha: scale α of the pull term.
        beta: scale β of the push term.
        weight: weight of the term.
    """

    def __init__(
        self,
        context: TransferContext,
        sigma: float = 1.0,
        delta: float = 1.0,
        alpha: float = 1.0,
        beta: float = 2.0,
        weight: float = 1.0,
    ) -> None:
        super().__init__(context)
        self.sigma = check_real("sigma", sigma, 0.0)
        self.delta = check_real("delta", delta, 0.0)
        self.alpha = check_real("alpha", alpha, 0.0)
        self.beta = check_real("beta", beta, 0.0)
        self.weight = check_weight("weight", weight)

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        loss = functional.relaxed_ms(
            student.embedding,
            teacher.embedding,
            num_views=self.num_views,
            sigma=self.sigma,
            delta=self.delta,
            alpha=self.alpha,
            beta=self.beta,
        )
        return {"relaxed_ms": self.weight * loss}

    def extra_repr(self) -> str:
        return (
            f"num_views={self.num_views}, sigma={self.sigma}, delta={self.delta}, alpha={self.alpha}, "
            f"beta={self.beta}, weight={self.weight}"
        )
