# Softmax cross-entropy classifiers used as stage-1 losses:
# - SoftmaxLoss: the plain FC + softmax baseline of PaddlePaddle/models PaddleCV/metric_learning/losses/
#   softmaxloss.py (seed-spec §2.3).
# - NormSoftmaxLoss: A. Zhai, H.-Y. Wu, "Classification is a Strong Baseline for Deep Metric Learning",
#   BMVC 2019 (arXiv:1811.12649), with the temperature convention of PyTorch-Metric-Learning's
#   NormalizedSoftmaxLoss (default 0.05).
"""Plain and normalised softmax cross-entropy losses with learnable class weights (C, D)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dmlkd.teacher.proxy_anchor import (
    check_batch,
    check_class_count,
    check_real,
    compute_dtype,
    full_precision,
    l2_normalize,
)


class SoftmaxLoss(nn.Module):
    """Unnormalised linear classifier ``x Wᵀ + b`` followed by softmax cross-entropy (batch mean).

    Args:
        num_classes: number of training classes C (>= 2).
        embedding_size: embedding width D.
    """

    lr_multiplier: float = 1.0  # PD train_elem.py: one optimizer, no per-parameter learning rates

    def __init__(self, num_classes: int, embedding_size: int) -> None:
        super().__init__()
        check_class_count(num_classes, embedding_size)
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        self.bias = nn.Parameter(torch.empty(num_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights ~ U(±1/√D) and bias 0, as PaddlePaddle's ``fc`` with a Uniform weight initializer."""
        bound = 1.0 / math.sqrt(self.embedding_size)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_size={self.embedding_size}"

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Return the (N, C) class logits, computed in at least float32 with autocast disabled."""
        dtype = compute_dtype(embeddings, self.weight)
        with full_precision(embeddings.device):
            return F.linear(embeddings.to(dtype), self.weight.to(dtype), self.bias.to(dtype))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss of a batch.

        Args:
            embeddings: (N, D) raw embeddings; gradients flow into them, ``weight`` and ``bias``.
            labels: (N,) integer class indices in ``0..C-1``.
        """
        check_batch(embeddings, labels, self.num_classes, self.embedding_size)
        logits = self.logits(embeddings)
        with full_precision(embeddings.device):
            return F.cross_entropy(logits, labels.long())


class NormSoftmaxLoss(nn.Module):
    """Normalised softmax: cross-entropy on ``cos(x, w_c) / temperature``.

    Both the embeddings and the class weights are L2-normalised at every forward pass, so only the weight
    directions matter.

    Args:
        num_classes: number of training classes C (>= 2).
        embedding_size: embedding width D.
        temperature: σ > 0 (default 0.05, as PML's ``NormalizedSoftmaxLoss``).
    """

    lr_multiplier: float = 1.0

    def __init__(self, num_classes: int, embedding_size: int, temperature: float = 0.05) -> None:
        super().__init__()
        check_class_count(num_classes, embedding_size)
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.temperature = check_real("norm_softmax temperature", temperature, 0.0)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Standard normal entries, as PML's default; the directions are then uniform on the sphere."""
        nn.init.normal_(self.weight)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, temperature={self.temperature}"

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Return the (N, C) logits ``cos / temperature``, in at least float32 with autocast disabled."""
        dtype = compute_dtype(embeddings, self.weight)
        with full_precision(embeddings.device):
            cosine = l2_normalize(embeddings.to(dtype)) @ l2_normalize(self.weight.to(dtype)).T
            return cosine / self.temperature

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss of a batch.

        Args:
            embeddings: (N, D) raw embeddings; gradients flow into them and ``weight``.
            labels: (N,) integer class indices in ``0..C-1``.
        """
        check_batch(embeddings, labels, self.num_classes, self.embedding_size)
        logits = self.logits(embeddings)
        with full_precision(embeddings.device):
            return F.cross_entropy(logits, labels.long())
