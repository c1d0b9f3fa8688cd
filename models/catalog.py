"""Facts about the registered architectures, for ``dmlkd models``."""

from __future__ import annotations

from typing import Any

import torch

from dmlkd.models.spec import DEFAULT_PREPROCESSING
from dmlkd.models.timm_backbone import TimmBackbone, default_timm_kwargs, pretrained_config
from dmlkd.registry import BACKBONES


def _input_convention(arch: str) -> str:
    pre = DEFAULT_PREPROCESSING[arch]
    scale = "0-255" if pre.value_range == 255.0 else "0-1"
    return f"{pre.color_order} {scale}, mean {list(pre.mean)}, std {list(pre.std)}"


def describe_architectures() -> list[dict[str, Any]]:
    """One row per architecture: tapped feature-map channels, pooled dimension and input convention."""
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


def describe_timm_model(arch: str) -> dict[str, Any]:
    """Facts about one timm model (``timm/NAME[.TAG]``), built on the meta device: no memory, no download."""

    cfg = pretrained_config(arch)
    with torch.device("meta"):
        backbone = TimmBackbone(arch, pretrained=False, timm_kwargs=default_timm_kwargs(arch, {}))
    pre = backbone.preprocessing
    return {
        "arch": arch,
        "pretrained_tag": cfg.tag,
        "hf_hub_id": cfg.hf_hub_id,
        "parameters": sum(p.numel() for p in backbone.parameters()),
        "pooled_dim": int(backbone.pooled_dim),
        "tap_kind": backbone.tap_kind,
        "tap_channels": list(backbone.tap_channels),
        "tap_strides": list(backbone.tap_strides),
        "input": f"RGB 0-1, mean {list(pre.mean)}, std {list(pre.std)}, {pre.input_size} px, {pre.interpolation}, "
        f"crop {pre.crop_pct}",
    }
