"""Model specifications (``resnet50-512``) and input preprocessing, torch-free.

A spec names an architecture and an embedding dimension. Each architecture carries the preprocessing its
ImageNet weights expect, so a teacher and a student with different conventions can be fed from the same
batch of RGB images in [0, 1]: every model converts its own input (see ``EmbeddingNet``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from dmlkd.errors import ModelSpecError, choices

ARCHITECTURES: tuple[str, ...] = ("bn_inception", "googlenet", "resnet18", "resnet34", "resnet50", "resnet101")


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its input: ``(x * value_range in colour_order - mean) / std`` per channel.

    ``mean`` and ``std`` are given in the model's colour order and value range.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    color_order: Literal["RGB", "BGR"] = "RGB"
    value_range: float = 1.0


IMAGENET = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# The Caffe-ported BN-Inception weights: BGR, 0-255, mean subtraction only (seed-spec §4).
CAFFE_BGR = Preprocessing(mean=(104.0, 117.0, 128.0), std=(1.0, 1.0, 1.0), color_order="BGR", value_range=255.0)

DEFAULT_PREPROCESSING: dict[str, Preprocessing] = {
    "bn_inception": CAFFE_BGR,
    "googlenet": IMAGENET,
    "resnet18": IMAGENET,
    "resnet34": IMAGENET,
    "resnet50": IMAGENET,
    "resnet101": IMAGENET,
}


@dataclass(frozen=True)
class ModelSpec:
    """An architecture name and an embedding dimension, written ``ARCH-DIM``."""

    arch: str
    dim: int

    def __str__(self) -> str:
        return f"{self.arch}-{self.dim}"


_SPEC = re.compile(r"^(?P<arch>[a-z_0-9]+?)-(?P<dim>-?\d+)$")


def parse_spec(text: str) -> ModelSpec:
    """Parse ``ARCH-DIM`` such as ``resnet18-128``; errors name the spec and the valid architectures."""
    match = _SPEC.match(text.strip())
    if not match:
        raise ModelSpecError(
            f"malformed model spec {text!r}; expected ARCH-DIM such as resnet50-512 "
            f"with ARCH one of: {choices(ARCHITECTURES)}"
        )
    arch, dim = match["arch"], int(match["dim"])
    if arch not in ARCHITECTURES:
        raise ModelSpecError(f"unknown architecture {arch!r} in model spec {text!r}; choose from: {choices(ARCHITECTURES)}")
    if dim <= 0:
        raise ModelSpecError(f"embedding dimension must be a positive integer, got {dim} in model spec {text!r}")
    return ModelSpec(arch, dim)
