# EML loss: C. Huang, C. C. Loy, X. Tang, "Local Similarity-Aware Deep Feature Embedding", NIPS 2016, and the
# ensemble metric surrogate of "Large Scale Strongly Supervised Ensemble Metric Learning", 2014.
# PaddlePaddle/models PaddleCV/metric_learning fine-tuning loss (seed-spec §2.13).
"""Ensemble metric learning (EML) loss on class-grouped batches."""

from __future__ import annotations

import math

import torch

from dmlkd.numerics import autocast_disabled, check_real, compute_dtype
from dmlkd.registry import TEACHER_LOSSES
from dmlkd.teacher.losses.base import PairLoss, masked_logsumexp, pair_masks, squared_distances


@TEACHER_LOSSES.register("eml")
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
        embedding_dim: embedding width D.
        beta: β (PaddlePaddle: 1e5).
        threshold: b above which the linearised form is used (PaddlePaddle: 20).
    """

    name = "eml"

    def __init__(self, num_classes: int, embedding_dim: int, beta: float = 1e5, threshold: float = 20.0) -> None:
        super().__init__(num_classes, embedding_dim)
        self.beta = check_real("eml beta", beta, 0.0)
        self.threshold = check_real("eml threshold", threshold, -math.inf)

    def extra_repr(self) -> str:
        return f"embedding_dim={self.embedding_dim}, beta={self.beta:g}, threshold={self.threshold}"

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the mean over anchors that have a positive (every anchor of a P x K batch with K >= 2)."""
        self.validated(embeddings, labels)
        with autocast_disabled(embeddings.device):
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
