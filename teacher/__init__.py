"""Stage 1: teacher (source) embeddings.

Losses: each is an ``nn.Module`` whose ``forward(embeddings, labels)`` returns a scalar and which owns
learnable class vectors (``proxies`` for Proxy-Anchor, ``weight`` for the classifiers), trained with the model
at ``lr * loss.lr_multiplier`` and saved in the checkpoint. They are registered in
``dmlkd.registry.TEACHER_LOSSES`` as ``proxy_anchor``, ``arcmargin``, ``softmax`` and ``norm_softmax``.
Pair losses without class vectors (batches need several images per class, ``--ipc``): ``triplet``,
``quadruplet``, ``eml``, ``npairs`` (PaddlePaddle's fine-tuning losses), ``multi_similarity``, ``contrastive``,
and ``margin`` (Wu et al., with a learnable boundary β).
Training: ``dmlkd.teacher.trainer.train_teacher`` / ``dmlkd teacher train``.

The names below are loaded on first use so that ``dmlkd --help`` does not import torch.
"""

from __future__ import annotations

from typing import Any

from dmlkd.lazy import submodule
from dmlkd.registry import TEACHER_LOSSES

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


def __getattr__(name: str) -> Any:
    if name in __all__:
        return next(TEACHER_LOSSES.get(n) for n in TEACHER_LOSSES.names() if TEACHER_LOSSES.get(n).__name__ == name)
    return submodule(__name__, name)  # e.g. dmlkd.teacher.<module> without importing it first
