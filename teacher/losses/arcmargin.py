# ArcMargin (additive angular margin) loss: J. Deng, J. Guo, N. Xue, S. Zafeiriou, "ArcFace: Additive Angular
# Margin Loss for Deep Face Recognition", CVPR 2019 (arXiv:1801.07698). DML defaults (m=0.15, s=80) and the
# monotonic fallback follow PaddlePaddle/models PaddleCV/metric_learning/losses/arcmarginloss.py
# (seed-spec §2.2).
"""ArcMargin loss: softmax cross-entropy on scaled cosines with an additive angular margin on the target."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dmlkd.numerics import check_real, l2_normalize
from dmlkd.registry import TEACHER_LOSSES
from dmlkd.teacher.losses.base import ClassifierLoss

SINE_EPS = 1e-6  # sinθ = sqrt(1 − cos²θ + 1e-6), as in the PaddlePaddle reference


def target_logit(cosine: torch.Tensor, margin: float, easy_margin: bool) -> torch.Tensor:
    """Return the margin-adjusted target cosine φ for every entry of ``cosine``.

    φ = cos(θ + m) = cosθ·cos m − sinθ·sin m. With ``easy_margin`` φ is used where cosθ > 0 and cosθ
    elsewhere; otherwise φ is used where cosθ > cos(π − m) and the monotonic fallback cosθ − m·sin(π − m)
    elsewhere (i.e. where θ + m would pass π).
    """
    sine = torch.sqrt((1.0 - cosine.pow(2)).clamp_min(0.0) + SINE_EPS)
    phi = cosine * math.cos(margin) - sine * math.sin(margin)
    if easy_margin:
        return torch.where(cosine > 0, phi, cosine)
    fallback = cosine - margin * math.sin(math.pi - margin)
    return torch.where(cosine > math.cos(math.pi - margin), phi, fallback)


@TEACHER_LOSSES.register("arcmargin")
class ArcMarginLoss(ClassifierLoss):
    """ArcMargin classification loss with learnable class weights (C, D).

    Logits are ``s·[onehot·φ + (1 − onehot)·cosθ]`` where cosθ is the cosine between the L2-normalised
    embedding and class weight and φ the margin-adjusted target cosine (see ``target_logit``), followed by
    softmax cross-entropy averaged over the batch. Computed in at least float32 with autocast disabled.

    Args:
        num_classes: number of training classes C (>= 2).
        embedding_dim: embedding width D.
        scale: s (PaddlePaddle DML default 80).
        margin: m in radians, in [0, π) (PaddlePaddle DML default 0.15).
        easy_margin: apply the margin only where cosθ > 0.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        scale: float = 80.0,
        margin: float = 0.15,
        easy_margin: bool = False,
    ) -> None:
        super().__init__(num_classes, embedding_dim)
        self.scale = check_real("arcmargin scale", scale, 0.0)
        self.margin = check_real("arcmargin margin", margin, 0.0, math.pi, closed=True)
        self.easy_margin = easy_margin
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier (Glorot) uniform, U(±sqrt(6 / (C + D))), as PaddlePaddle's default ``Xavier()``."""
        nn.init.xavier_uniform_(self.weight)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, scale={self.scale}, "
            f"margin={self.margin}, easy_margin={self.easy_margin}"
        )

    def class_logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The (N, C) scaled logits with the margin applied to each sample's target class."""
        cosine = l2_normalize(embeddings) @ l2_normalize(self.weight.to(embeddings.dtype)).T
        target = F.one_hot(labels.long(), self.num_classes).bool()
        adjusted = torch.where(target, target_logit(cosine, self.margin, self.easy_margin), cosine)
        return self.scale * adjusted
