"""Stage 2: embedding transfer from a frozen teacher to a student.

Methods (registered in ``dmlkd.registry.TRANSFER_METHODS``): ``relaxed_contrastive``, ``relaxed_ms``, ``rkd``,
``pkt``, ``darkrank``, ``fitnet``, ``attention``, ``crd``. The pure tensor math lives in
``dmlkd.transfer.functional``; training in ``dmlkd.transfer.trainer.train_transfer``
(``dmlkd transfer train``).
Names are loaded on first use so that ``dmlkd --help`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from dmlkd.lazy import submodule

__all__ = ["TransferMethod", "functional"]


def __getattr__(name: str) -> Any:
    if name == "functional":
        return importlib.import_module("dmlkd.transfer.functional")
    if name == "TransferMethod":
        from dmlkd.transfer.base import TransferMethod

        return TransferMethod
    return submodule(__name__, name)  # e.g. dmlkd.transfer.<module> without importing it first
