# A. Zhai, H.-Y. Wu, "Classification is a Strong Baseline for Deep Metric Learning",
# BMVC 2019 (arXiv:1811.12649), with the temperature convention of PyTorch-Metric-Learning's
# NormalizedSoftmaxLoss (default 0.05).
"""Normalised softmax cross-entropy: cosine logits to learnable class weights (C, D) over a temperature."""

from __future__ import annotations

import torch
from torch import nn

from dmlkd.numerics import check_real, l2_normalize
from dmlkd.registry import TEACHER_LOSSES
from dmlkd.teacher.losses.base import ClassifierLoss


@TEACHER_LOSSES.register("norm_softmax")
class NormSoftmaxLoss(ClassifierLoss):
    """Normalised softmax: cross-entropy on ``cos(x, w_c) / temperature``.

    Both the embeddings and the class weights are L2-normalised at every forward pass, so only the weight
    directions matter.

    Args:
        num_classes: number of training classes C (>= 2).
        embedding_dim: embedding width D.
        temperature: σ > 0 (default 0.05, as PML's ``NormalizedSoftmaxLoss``).
    """

    def __init__(self, num_classes: int, embedding_dim: int, temperature: float = 0.05) -> None:
        super().__init__(num_classes, embedding_dim)
        self.temperature = check_real("norm_softmax temperature", temperature, 0.0)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Standard normal entries, as PML's default; the directions are then uniform on the sphere."""
        nn.init.normal_(self.weight)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, temperature={self.temperature}"

    def class_logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The (N, C) logits ``cos / temperature``; ``labels`` are not used."""
        cosine = l2_normalize(embeddings) @ l2_normalize(self.weight.to(embeddings.dtype)).T
        return cosine / self.temperature
