# Quadruplet loss: Q. Xiao, H. Luo, C. Zhang, "Margin Sample Mining Loss: A Deep Learning Based Method for Person
# Re-identification", 2017 (arXiv:1710.00478).
# PaddlePaddle/models PaddleCV/metric_learning fine-tuning loss (seed-spec §2.13).
"""Batch-global hardest-pair (quadruplet) loss on class-grouped batches."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dmlkd.registry import TEACHER_LOSSES
from dmlkd.teacher.losses.base import MarginPairLoss, pair_masks, squared_distances


@TEACHER_LOSSES.register("quadruplet")
class QuadrupletLoss(MarginPairLoss):
    """Batch-global hardest pair loss: ``relu(max positive d − min negative d + m)``.

    d is the squared Euclidean distance between L2-normalised embeddings; the maximum runs over every positive
    pair of the batch and the minimum over every negative pair (PaddlePaddle's ``QuadrupletLoss``); gradients
    reach only the rows of the two extreme pairs. Options: ``MarginPairLoss``.
    """

    name = "quadruplet"

    def unit_loss(self, unit: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dist = squared_distances(unit)
        positive, negative = pair_masks(labels)
        hardest_positive = dist.masked_fill(~positive, -math.inf).amax()
        hardest_negative = dist.masked_fill(~negative, math.inf).amin()
        return F.relu(hardest_positive - hardest_negative + self.margin)
