# Triplet loss: F. Schroff, D. Kalenichenko, J. Philbin, "FaceNet: A Unified Embedding for Face Recognition and
# Clustering", CVPR 2015 (arXiv:1503.03832).
# PaddlePaddle/models PaddleCV/metric_learning fine-tuning loss (seed-spec §2.13).
"""Batch-all triplet loss on class-grouped batches (no trainable parameters)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmlkd.registry import TEACHER_LOSSES
from dmlkd.teacher.losses.base import MarginPairLoss, pair_masks, squared_distances


@TEACHER_LOSSES.register("triplet")
class TripletLoss(MarginPairLoss):
    """Batch-all triplet loss on squared distances of L2-normalised embeddings.

    ``L = mean over triplets (a, p, n) of relu(d(a, p) + m − d(a, n))`` with d the squared Euclidean distance.

    Mining rule: every positive pair {i, j} (i < j, same class) taken once, with the earlier row as the
    anchor, against every negative n of the anchor; the mean runs over all these triplets, zero-loss ones
    included (as PaddlePaddle averages its triplets). On a batch that is one PaddlePaddle triplet (rows a, p,
    n) this is exactly PaddlePaddle's ``relu(d_ap + m − d_an)``. PaddlePaddle's reader draws triplets with a
    uniformly random class for (a, p) and a uniformly random other class for n; on a P x K batch the triplets
    above have the same distribution, so the expected loss matches PaddlePaddle's. Options: ``MarginPairLoss``.
    """

    name = "triplet"

    def unit_loss(self, unit: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dist = squared_distances(unit)
        positive, negative = pair_masks(labels)
        anchor, other = torch.triu(positive, diagonal=1).nonzero(as_tuple=True)  # (M,) pairs, anchor < other
        terms = F.relu(dist[anchor, other][:, None] + self.margin - dist[anchor])  # (M, N) over negatives
        valid = negative[anchor]
        return (terms * valid).sum() / valid.sum()
