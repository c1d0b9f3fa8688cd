# N-pairs loss: K. Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss Objective", NIPS 2016.
# PaddlePaddle/models PaddleCV/metric_learning fine-tuning loss (seed-spec §2.13).
"""Multi-class N-pairs loss on class-grouped batches."""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F

from dmlkd.errors import DataError
from dmlkd.numerics import autocast_disabled, check_real, compute_dtype
from dmlkd.registry import TEACHER_LOSSES
from dmlkd.teacher.losses.base import PairLoss, describe_batch


@TEACHER_LOSSES.register("npairs")
class NPairsLoss(PairLoss):
    """Multi-class N-pair loss on raw embeddings, with PaddlePaddle's L2 regulariser.

    The batch must be N/2 classes x 2 images in consecutive rows (``--ipc 2``): rows 0, 2, 4, ... are the
    anchors, rows 1, 3, 5, ... their positives. Logits are ``anchors · positivesᵀ`` (N/2, N/2); targets are
    PaddlePaddle's soft label-equality rows (the identity here, since every class appears once on each side);
    the loss is the mean cross-entropy plus ``0.5 · λ · mean_i ‖x_i‖²`` over all N rows.

    Args:
        num_classes: number of training classes (>= 2; only used to check labels).
        embedding_dim: embedding width D.
        reg_lambda: λ (PaddlePaddle default 0.01).
    """

    name = "npairs"

    def __init__(self, num_classes: int, embedding_dim: int, reg_lambda: float = 0.01) -> None:
        super().__init__(num_classes, embedding_dim)
        self.reg_lambda = check_real("npairs reg_lambda", reg_lambda, 0.0, closed=True)

    def extra_repr(self) -> str:
        return f"embedding_dim={self.embedding_dim}, reg_lambda={self.reg_lambda}"

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
        with autocast_disabled(embeddings.device):
            x = embeddings.to(compute_dtype(embeddings))
            anchors, positives = x[0::2], x[1::2]
            targets = (labels[0::2, None] == labels[None, 1::2]).to(x.dtype)
            targets = targets / targets.sum(dim=1, keepdim=True)
            cross_entropy = F.cross_entropy(anchors @ positives.T, targets)
            return cross_entropy + 0.5 * self.reg_lambda * x.pow(2).sum(dim=1).mean()
