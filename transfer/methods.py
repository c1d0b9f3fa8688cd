"""Registers the built-in transfer methods in ``dmlkd.registry.TRANSFER_METHODS`` (the factory is the class).

Build one with ``TRANSFER_METHODS.build(name, student=ModelInfo, teacher=ModelInfo, num_classes=C,
num_train=N, num_views=V, **options)``; ``TRANSFER_METHODS.get(name).options()`` lists its options.
"""

from __future__ import annotations

from dmlkd.registry import TRANSFER_METHODS
from dmlkd.transfer.base import TransferMethod
from dmlkd.transfer.crd import CRD
from dmlkd.transfer.feature import AttentionTransfer, FitNet
from dmlkd.transfer.relational import PKT, RKD, DarkRank
from dmlkd.transfer.relaxed import RelaxedContrastive, RelaxedMS

__all__ = ["BUILTIN_METHODS"]

BUILTIN_METHODS: tuple[type[TransferMethod], ...] = (
    RelaxedContrastive, RelaxedMS, RKD, PKT, DarkRank, FitNet, AttentionTransfer, CRD
)  # fmt: skip

for _method in BUILTIN_METHODS:
    TRANSFER_METHODS.register(_method.method_name)(_method)
