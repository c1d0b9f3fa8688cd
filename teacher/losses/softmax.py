# Plain FC + softmax baseline of PaddlePaddle/models PaddleCV/metric_learning/losses/softmaxloss.py
# (seed-spec §2.3).
"""Plain softmax cross-entropy loss with a learnable linear classifier (C, D) and bias."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dmlkd.registry import TEACHER_LOSSES
from dmlkd.teacher.losses.base import ClassifierLoss


@TEACHER_LOSSES.register("softmax")
class SoftmaxLoss(ClassifierLoss):
    """Unnormalised linear classifier ``x Wᵀ + b`` followed by softmax cross-entropy (batch mean).

    Args:
        num_classes: number of training classes C (>= 2).
        embedding_dim: embedding width D.
    """

    def __init__(self, num_classes: int, embedding_dim: int) -> None:
        super().__init__(num_classes, embedding_dim)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        self.bias = nn.Parameter(torch.empty(num_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights ~ U(±1/√D) and bias 0, as PaddlePaddle's ``fc`` with a Uniform weight initializer."""
        bound = 1.0 / math.sqrt(self.embedding_dim)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.zeros_(self.bias)

    def class_logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The (N, C) logits ``x Wᵀ + b``; ``labels`` are not used."""
        return F.linear(embeddings, self.weight.to(embeddings.dtype), self.bias.to(embeddings.dtype))
