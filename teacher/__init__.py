"""Stage-1 (teacher) losses.

Each loss is an ``nn.Module`` whose ``forward(embeddings, labels)`` returns a scalar and which owns learnable
class vectors (``proxies`` for Proxy-Anchor, ``weight`` for the classifiers). Train those parameters with the
model, at ``lr × loss.lr_multiplier``, and save them in the checkpoint. Importing this package registers the
losses in ``dmlkd.registry.TEACHER_LOSSES`` under ``proxy_anchor``, ``arcmargin``, ``softmax`` and
``norm_softmax``; each factory is the class itself, called as
``factory(num_classes=C, embedding_size=D, **kwargs)``.
"""

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
