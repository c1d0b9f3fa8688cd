"""Registers the stage-1 losses in ``dmlkd.registry.TEACHER_LOSSES`` (importing this module is enough)."""

from __future__ import annotations

from dmlkd.registry import TEACHER_LOSSES
from dmlkd.teacher.arcmargin import ArcMarginLoss
from dmlkd.teacher.proxy_anchor import ProxyAnchorLoss
from dmlkd.teacher.softmax import NormSoftmaxLoss, SoftmaxLoss

__all__ = ["ArcMarginLoss", "NormSoftmaxLoss", "ProxyAnchorLoss", "SoftmaxLoss"]

TEACHER_LOSSES.register("proxy_anchor")(ProxyAnchorLoss)
TEACHER_LOSSES.register("arcmargin")(ArcMarginLoss)
TEACHER_LOSSES.register("softmax")(SoftmaxLoss)
TEACHER_LOSSES.register("norm_softmax")(NormSoftmaxLoss)
