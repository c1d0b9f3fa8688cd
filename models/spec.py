"""Model specifications (``resnet50-512``) and input preprocessing, torch-free.

A spec names an architecture and an embedding dimension. Each architecture carries the preprocessing its
ImageNet weights expect, so a teacher and a student with different conventions can be fed from the same
batch of RGB images in [0, 1]: every model converts its own input (see ``EmbeddingNet``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from typing import Any, Literal

from dmlkd.errors import ConfigError, ModelSpecError, choices

ARCHITECTURES: tuple[str, ...] = (
    "bn_inception",
    "googlenet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
)


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


# Backbone parameters (without the head) and channels of the pooled feature, per architecture; the embedding
# head adds (pooled + 1) * D. Used to refuse a model that cannot fit in memory before building it.
BACKBONE_SIZES: dict[str, tuple[int, int]] = {
    "bn_inception": (10_270_240, 1024),
    "googlenet": (5_599_904, 1024),
    "resnet18": (11_176_512, 512),
    "resnet34": (21_284_672, 512),
    "resnet50": (23_508_032, 2048),
    "resnet101": (42_500_160, 2048),
}

# The smallest input side each architecture accepts (a smaller map shrinks to nothing inside the network).
# The Caffe-ported BN-Inception concatenates branches whose ceil/floor poolings agree only for sides with
# (side + 1) % 32 < 8: 31-38, 63-70, ..., 223-230, 255-262.
MIN_INPUT_SIZE: dict[str, int] = {
    "bn_inception": 31,
    "googlenet": 15,
    "resnet18": 1,
    "resnet34": 1,
    "resnet50": 1,
    "resnet101": 1,
}


def input_size_problem(arch: str, height: int, width: int) -> str | None:
    """Why ``arch`` cannot embed ``height x width`` images (a readable reason naming valid sizes), or None."""
    smallest = MIN_INPUT_SIZE.get(arch, 1)
    if min(height, width) < smallest:
        return f"{arch} needs images of at least {smallest}x{smallest} pixels, got {height}x{width}"
    if arch == "bn_inception":
        bad = [side for side in (height, width) if (side + 1) % 32 >= 8]
        if bad:
            below = max(31, (bad[0] + 1) // 32 * 32 - 1)
            return (
                f"bn_inception cannot embed {height}x{width} images: each side must satisfy (side + 1) % 32 < 8, "
                f"e.g. {below}-{below + 7} or 224 (got {bad[0]})"
            )
    return None


def parameter_count(arch: str, embedding_dim: int) -> int:
    """Parameters of ``ARCH-DIM``: the backbone's plus the linear head's."""
    backbone, pooled = BACKBONE_SIZES[arch]
    return backbone + (pooled + 1) * embedding_dim


def memory_bytes() -> int | None:
    """Physical memory of this machine, or None where it cannot be asked."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def _check_fits(arch: str, embedding_dim: int, where: str) -> None:
    """Refuse a model whose float32 weights alone exceed the machine's memory, before anything is allocated."""
    count = parameter_count(arch, embedding_dim)
    available = memory_bytes()
    if available is not None and 4 * count > available:
        raise ModelSpecError(
            f"{where} would have {count:.3g} parameters ({4 * count / 2**30:,.0f} GiB as float32), more than this "
            f"machine's {available / 2**30:,.0f} GiB of memory; use a smaller embedding dimension "
            "(the papers use 64-512)"
        )


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
        raise ModelSpecError(
            f"unknown architecture {arch!r} in model spec {text!r}; choose from: {choices(ARCHITECTURES)}"
        )
    if dim <= 0:
        raise ModelSpecError(f"embedding dimension must be a positive integer, got {dim} in model spec {text!r}")
    _check_fits(arch, dim, f"model spec {text!r}")
    return ModelSpec(arch, dim)


HEAD_INITS: tuple[str, ...] = ("orthogonal", "kaiming")
POOLINGS: tuple[str, ...] = ("avg+max", "avg", "max")


@dataclass
class ModelConfig:
    """Everything needed to build an ``EmbeddingNet``; JSON-round-trippable through ``dmlkd.config``.

    Attributes:
        arch: backbone name, one of ``ARCHITECTURES``.
        embedding_dim: output dimension ``D`` of the linear embedding head.
        l2_norm: L2-normalise the embedding inside the model (the reference teachers do, students do not).
        head_init: ``orthogonal`` (LR students) or ``kaiming`` (normal, fan_out; PA teachers); bias 0.
        pooling: global pooling of the last map; ``avg+max`` is GAP + GMP summed (seed-spec §4).
        pretrained: start the backbone from ImageNet weights (torchvision / the Caffe BN-Inception port).
        weights_path: a local backbone weight file (``.safetensors`` or ``.pth``); when set it is loaded
            instead of downloading, whatever ``pretrained`` says.
        bn_momentum: BatchNorm momentum in PyTorch semantics; None keeps the architecture default
            (0.9 for bn_inception, as the Caffe port has; 0.1 for torchvision nets).
        preprocessing: input convention; None means ``DEFAULT_PREPROCESSING[arch]``.
    """

    arch: str
    embedding_dim: int
    l2_norm: bool = False
    head_init: Literal["orthogonal", "kaiming"] = "orthogonal"
    pooling: Literal["avg+max", "avg", "max"] = "avg+max"
    pretrained: bool = False
    weights_path: str | None = None
    bn_momentum: float | None = None
    preprocessing: Preprocessing | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ModelSpecError(f"unknown architecture {self.arch!r}; choose from: {choices(ARCHITECTURES)}")
        if isinstance(self.embedding_dim, bool) or not isinstance(self.embedding_dim, int) or self.embedding_dim <= 0:
            raise ModelSpecError(f"embedding_dim must be a positive integer, got {self.embedding_dim!r}")
        _check_fits(self.arch, self.embedding_dim, f"model {self.arch}-{self.embedding_dim}")
        if self.head_init not in HEAD_INITS:
            raise ConfigError(f"model.head_init {self.head_init!r} is not valid; choose from: {choices(HEAD_INITS)}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"model.pooling {self.pooling!r} is not valid; choose from: {choices(POOLINGS)}")
        if self.bn_momentum is not None and not 0.0 <= self.bn_momentum <= 1.0:
            raise ConfigError(f"model.bn_momentum must lie in [0, 1] (PyTorch semantics), got {self.bn_momentum!r}")
        if self.preprocessing is not None:
            _check_preprocessing(self.preprocessing)

    @classmethod
    def from_spec(cls, text: str, **overrides: Any) -> ModelConfig:
        """``ModelConfig.from_spec("resnet50-512", l2_norm=True)``; unknown options are a ``ConfigError``."""
        spec = parse_spec(text)
        allowed = {field.name for field in fields(cls)} - {"arch", "embedding_dim"}
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise ConfigError(f"unknown model option {unknown[0]!r}; valid options: {choices(allowed)}")
        return cls(arch=spec.arch, embedding_dim=spec.dim, **overrides)

    @property
    def spec(self) -> ModelSpec:
        """The ``ARCH-DIM`` spec of this model."""
        return ModelSpec(self.arch, self.embedding_dim)

    def resolved_preprocessing(self) -> Preprocessing:
        """The preprocessing the model applies: the explicit one, else the architecture default."""
        return self.preprocessing if self.preprocessing is not None else DEFAULT_PREPROCESSING[self.arch]

    def weights_source(self) -> bool | str:
        """What the backbone builder gets as ``pretrained``: the local path if given, else the flag."""
        return self.weights_path if self.weights_path is not None else self.pretrained


def _check_preprocessing(prep: Preprocessing) -> None:
    if len(prep.mean) != 3 or len(prep.std) != 3:
        raise ConfigError(f"model.preprocessing needs 3 mean and 3 std values, got {prep.mean!r} and {prep.std!r}")
    if any(value <= 0 for value in prep.std):
        raise ConfigError(f"model.preprocessing.std must be positive, got {prep.std!r}")
    if prep.color_order not in ("RGB", "BGR"):
        raise ConfigError(f"model.preprocessing.color_order {prep.color_order!r} is not valid; choose from: BGR, RGB")
    if prep.value_range <= 0:
        raise ConfigError(f"model.preprocessing.value_range must be positive, got {prep.value_range!r}")
