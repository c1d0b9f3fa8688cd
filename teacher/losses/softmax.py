# Plain FC + softmax baseline of PaddlePaddle/models PaddleCV/metric_learning/losses/softmaxloss.py
# (seed-spec §2.3).
"""Plain softmax cross-entropy loss with a learnable linear classifier (C, D) and bias."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dmlkd.numerics import autocast_disabled, compute_dtype
from dmlkd.registry import TEACHER_LOSSES
from dmlkd.teacher.losses.base import check_batch, check_class_count


@TEACHER_LOSSES.register("softmax")
class SoftmaxLoss(nn.Module):
    """Unnormalised linear classifier ``x Wᵀ + b`` followed by softmax cross-entropy (batch mean).

    Args:
        num_classes: number of training classes C (>= 2).
        embedding_dim: embedding width D.
    """

    lr_multiplier: float = 1.0  # PD train_elem.py: one optimizer, no per-parameter learning rates

    def __init__(self, num_classes: int, embedding_dim: int) -> None:
        super().__init__()
        check_class_count(num_classes, embedding_dim)
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        self.bias = nn.Parameter(torch.empty(num_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights ~ U(±1/√D) and bias 0, as PaddlePaddle's ``fc`` with a Uniform weight initializer."""
        bound = 1.0 / math.sqrt(self.embedding_dim)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}"

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Return the (N, C) class logits, computed in at least float32 with autocast disabled."""
        dtype = compute_dtype(embeddings, self.weight)
        with autocast_disabled(embeddings.device):
            return F.linear(embeddings.to(dtype), self.weight.to(dtype), self.bias.to(dtype))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss of a batch.

        Args:
            embeddings: (N, D) raw embeddings; gradients flow into them, ``weight`` and ``bias``.
            labels: (N,) integer class indices in ``0..C-1``.
        """
        check_batch(embeddings, labels, self.num_classes, self.embedding_dim)
        logits = self.logits(embeddings)
        with autocast_disabled(embeddings.device):
            return F.cross_entropy(logits, labels.long())
