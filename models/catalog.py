"""Facts about the registered architectures, for ``dmlkd models``."""

from __future__ import annotations

from typing import Any

import torch

from dmlkd.models.spec import DEFAULT_PREPROCESSING
from dmlkd.registry import BACKBONES


def _input_convention(arch: str) -> str:
    pre = DEFAULT_PREPROCESSING[arch]
    scale = "0-255" if pre.value_range == 255.0 else "0-1"
    return f"{pre.color_order} {scale}, mean {list(pre.mean)}, std {list(pre.std)}"


def describe_architectures() -> list[dict[str, Any]]:
    """One row per architecture: tapped stage channels, pooled dimension and input convention."""
    rows = []
    for arch in BACKBONES.names():
        with torch.device("meta"):  # no memory, no weight download: only the shapes are needed
            backbone = BACKBONES.build(arch, pretrained=False)
        rows.append(
            {
                "arch": arch,
                "tap_channels": list(backbone.tap_channels),
                "pooled_dim": int(backbone.out_channels),
                "input": _input_convention(arch),
            }
        )
    return rows
