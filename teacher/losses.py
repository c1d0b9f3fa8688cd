"""Registers the stage-1 losses in ``dmlkd.registry.TEACHER_LOSSES`` (importing this module is enough)."""

from __future__ import annotations

from dmlkd.registry import TEACHER_LOSSES
from dmlkd.teacher.arcmargin import ArcMarginLoss
from dmlkd.teacher.margin import MarginLoss
from dmlkd.teacher.ms_contrastive import ContrastiveLoss, MultiSimilarityLoss
from dmlkd.teacher.pair_losses import EMLLoss, NPairsLoss, QuadrupletLoss, TripletLoss
from dmlkd.teacher.proxy_anchor import ProxyAnchorLoss
from dmlkd.teacher.softmax import NormSoftmaxLoss, SoftmaxLoss

__all__ = [
    "ArcMarginLoss",
    "ContrastiveLoss",
    "EMLLoss",
    "MarginLoss",
    "MultiSimilarityLoss",
    "NPairsLoss",
    "NormSoftmaxLoss",
    "ProxyAnchorLoss",
    "QuadrupletLoss",
    "SoftmaxLoss",
    "TripletLoss",
]

TEACHER_LOSSES.register("proxy_anchor")(ProxyAnchorLoss)
TEACHER_LOSSES.register("arcmargin")(ArcMarginLoss)
TEACHER_LOSSES.register("softmax")(SoftmaxLoss)
TEACHER_LOSSES.register("norm_softmax")(NormSoftmaxLoss)
# Pair losses: PaddlePaddle's fine-tuning losses (seed-spec §2.13), the PML-wrapped ones of §2.4, Wu et al.
TEACHER_LOSSES.register("triplet")(TripletLoss)
TEACHER_LOSSES.register("quadruplet")(QuadrupletLoss)
TEACHER_LOSSES.register("eml")(EMLLoss)
TEACHER_LOSSES.register("npairs")(NPairsLoss)
TEACHER_LOSSES.register("multi_similarity")(MultiSimilarityLoss)
TEACHER_LOSSES.register("contrastive")(ContrastiveLoss)
TEACHER_LOSSES.register("margin")(MarginLoss)
