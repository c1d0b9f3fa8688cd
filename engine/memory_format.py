"""``channels_last`` for convolutional models trained under bf16/fp16 on CUDA (tensor-core convolutions)."""

from __future__ import annotations

import torch
from torch import nn

from dmlkd.models.embedding import EmbeddingNet


def use_channels_last(module: nn.Module, mixed_precision: str, device: torch.device) -> bool:
    """Convert ``module`` (and the inputs of its ``EmbeddingNet`` s) to channels_last when it pays.

    It pays for convolutions under fp16/bf16 autocast on CUDA; fp32 and CPU runs keep the default layout, so
    their numerics do not change. Parameters are converted in place (the optimiser's references stay valid).
    Returns whether the module was converted.
    """

    if mixed_precision not in ("fp16", "bf16") or device.type != "cuda":
        return False
    if not any(isinstance(layer, nn.Conv2d) for layer in module.modules()):
        return False
    module.to(memory_format=torch.channels_last)
    for layer in module.modules():
        if isinstance(layer, EmbeddingNet):
            layer.input_memory_format = torch.channels_last
    return True
