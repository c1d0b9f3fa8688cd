"""Model specifications (``resnet50-512``, ``timm/mobilenetv3_large_100-128``) and input preprocessing, torch-free.

A spec names an architecture and an embedding dimension. Each architecture carries the preprocessing its
ImageNet weights expect, so a teacher and a student with different conventions can be fed from the same
batch of RGB images in [0, 1]: every model converts its own input (see ``EmbeddingNet``).

timm models (the optional ``timm`` extra) are written ``timm/NAME[.TAG][@REVISION]-DIM``: ``NAME`` is a timm
model name, ``TAG`` its pretrained tag (``vit_small_patch14_dinov2.lvd142m``), ``REVISION`` a Hub branch, tag
or commit of the weights repository, and ``DIM`` the embedding size; ``DIM`` 0 means no embedding head (the
model's pooled feature is the embedding). The ``timm/`` prefix keeps these apart from the ``ARCH-DIM`` specs
of the built-in architectures; their preprocessing comes from the model's timm pretrained config.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
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
    # Recorded from a timm pretrained config (None for the built-in architectures): the input size the
    # weights were trained at, the resize interpolation and the centre-crop fraction of the eval view.
    input_size: int | None = None
    interpolation: str | None = None
    crop_pct: float | None = None


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


TIMM_PREFIX = "timm/"


@dataclass(frozen=True)
class ModelSpec:
    """An architecture name and an embedding dimension, written ``ARCH-DIM`` (``timm/NAME[.TAG][@REV]-DIM``)."""

    arch: str
    dim: int
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.arch}{'@' + self.revision if self.revision else ''}-{self.dim}"


_SPEC = re.compile(r"^(?P<arch>[a-z_0-9]+?)-(?P<dim>-?\d+)$")
# A timm model name and optional pretrained tag (both as timm spells them), an optional Hub revision.
_TIMM_ARCH = re.compile(r"^timm/(?P<name>[A-Za-z0-9_]+)(?:\.(?P<tag>[A-Za-z0-9_]+))?$")
_TIMM_SPEC = re.compile(
    r"^(?P<arch>timm/[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)(?:@(?P<revision>[A-Za-z0-9._/]+?))?(?:-(?P<dim>-?\d+))?$"
)
TIMM_SPEC_HELP = (
    "timm/NAME[.TAG][@REVISION]-DIM such as timm/mobilenetv3_large_100-128 or "
    "timm/vit_small_patch14_dinov2.lvd142m-0 (DIM 0: no head, the pooled feature is the embedding)"
)


def is_timm_arch(arch: str) -> bool:
    """Whether ``arch`` names a timm model (``timm/NAME[.TAG]``)."""
    return isinstance(arch, str) and arch.startswith(TIMM_PREFIX)


def split_timm_arch(arch: str) -> tuple[str, str | None]:
    """``timm/NAME.TAG`` -> ``(NAME, TAG)`` (TAG None when absent); a ``ModelSpecError`` if malformed."""
    match = _TIMM_ARCH.match(arch)
    if not match:
        raise ModelSpecError(f"malformed timm model {arch!r}; expected {TIMM_SPEC_HELP}")
    return match["name"], match["tag"]


def parse_timm_spec(text: str, default_dim: int | None = None) -> ModelSpec:
    """Parse ``timm/NAME[.TAG][@REVISION][-DIM]``; ``-DIM`` may be left out only when ``default_dim`` is given."""
    match = _TIMM_SPEC.match(text.strip())
    if not match:
        raise ModelSpecError(f"malformed timm model spec {text!r}; expected {TIMM_SPEC_HELP}")
    if match["dim"] is None and default_dim is None:
        raise ModelSpecError(f"timm model spec {text!r} has no embedding dimension; expected {TIMM_SPEC_HELP}")
    dim = int(match["dim"]) if match["dim"] is not None else int(default_dim)  # type: ignore[arg-type]
    if dim < 0:
        raise ModelSpecError(f"embedding dimension must be 0 (no head) or positive, got {dim} in {text!r}")
    return ModelSpec(match["arch"], dim, match["revision"])


def parse_spec(text: str) -> ModelSpec:
    """Parse ``ARCH-DIM`` such as ``resnet18-128`` (or a ``timm/...-DIM`` spec); errors name the valid forms."""
    if text.strip().startswith(TIMM_PREFIX):
        return parse_timm_spec(text)
    match = _SPEC.match(text.strip())
    if not match:
        raise ModelSpecError(
            f"malformed model spec {text!r}; expected ARCH-DIM such as resnet50-512 "
            f"with ARCH one of: {choices(ARCHITECTURES)}, or {TIMM_SPEC_HELP}"
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
        arch: backbone name, one of ``ARCHITECTURES``, or a timm model ``timm/NAME[.TAG]``.
        embedding_dim: output dimension ``D`` of the linear embedding head; 0 (timm models only) means no
            head: the embedding is the model's pooled feature.
        l2_norm: L2-normalise the embedding inside the model (the reference teachers do, students do not).
        head_init: ``orthogonal`` (LR students) or ``kaiming`` (normal, fan_out; PA teachers); bias 0.
        pooling: global pooling of the last map; ``avg+max`` is GAP + GMP summed (seed-spec §4).
        pretrained: start the backbone from ImageNet weights (torchvision / the Caffe BN-Inception port).
        weights_path: a local backbone weight file (``.safetensors`` or ``.pth``); when set it is loaded
            instead of downloading, whatever ``pretrained`` says.
        bn_momentum: BatchNorm momentum in PyTorch semantics; None keeps the architecture default
            (0.9 for bn_inception, as the Caffe port has; 0.1 for torchvision nets).
        preprocessing: input convention; None means ``DEFAULT_PREPROCESSING[arch]`` (for timm models: the
            pretrained config's; a built timm model records it here, so checkpoints carry it).
        revision: timm models: the Hub revision (branch, tag or commit) of the pretrained weights.
        timm_kwargs: timm models: extra ``timm.create_model`` arguments (``{"img_size": 224}`` ...).
        zero_init_residual: ResNets: start the last BatchNorm of every residual branch at gamma 0, so each
            block begins as the identity (torchvision's ``zero_init_residual``; Goyal et al. 2017). It changes
            only a random initialisation: pretrained or ``weights_path`` weights overwrite it.
        pooling: ignored for timm models, which pool as their own head does (CLS token for ViTs).
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
    revision: str | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    zero_init_residual: bool = False

    def __post_init__(self) -> None:
        timm = is_timm_arch(self.arch)
        if timm:
            split_timm_arch(self.arch)
        elif self.arch not in ARCHITECTURES:
            raise ModelSpecError(
                f"unknown architecture {self.arch!r}; choose from: {choices(ARCHITECTURES)}, or {TIMM_SPEC_HELP}"
            )
        if isinstance(self.embedding_dim, bool) or not isinstance(self.embedding_dim, int) or self.embedding_dim < 0:
            raise ModelSpecError(f"embedding_dim must be a positive integer, got {self.embedding_dim!r}")
        if self.embedding_dim == 0 and not timm:
            raise ModelSpecError(
                f"embedding_dim must be a positive integer, got 0 (0, no head, is for timm models only: {self.arch!r})"
            )
        if not timm and (self.revision is not None or self.timm_kwargs):
            raise ConfigError(f"model.revision and model.timm_kwargs apply to timm models only, not {self.arch!r}")
        if self.zero_init_residual and not self.arch.startswith("resnet"):
            raise ConfigError(f"model.zero_init_residual applies to ResNets only, not {self.arch!r}")
        if not timm:
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
        allowed = {item.name for item in fields(cls)} - {"arch", "embedding_dim"}
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise ConfigError(f"unknown model option {unknown[0]!r}; valid options: {choices(allowed)}")
        if spec.revision is not None:
            overrides.setdefault("revision", spec.revision)
        return cls(arch=spec.arch, embedding_dim=spec.dim, **overrides)

    @property
    def spec(self) -> ModelSpec:
        """The ``ARCH-DIM`` spec of this model."""
        return ModelSpec(self.arch, self.embedding_dim, self.revision)

    @property
    def is_timm(self) -> bool:
        return is_timm_arch(self.arch)

    def resolved_preprocessing(self) -> Preprocessing:
        """The preprocessing the model applies: the explicit one, else the architecture default."""
        if self.preprocessing is not None:
            return self.preprocessing
        if self.is_timm:  # needs timm (and so torch); built timm models record theirs in ``preprocessing``
            raise ModelSpecError(
                f"the preprocessing of timm model {self.arch!r} comes from its pretrained config; build the model "
                "(dmlkd.models.create_model) or use dmlkd.models.embedding.preprocessing_of(config)"
            )
        return DEFAULT_PREPROCESSING[self.arch]

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
    if prep.input_size is not None and prep.input_size <= 0:
        raise ConfigError(f"model.preprocessing.input_size must be positive, got {prep.input_size!r}")
    if prep.crop_pct is not None and not 0 < prep.crop_pct <= 1:
        raise ConfigError(f"model.preprocessing.crop_pct must lie in (0, 1], got {prep.crop_pct!r}")
