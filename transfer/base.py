"""The contract every embedding-transfer method implements (seed-spec §2.5–2.14).

A method is an ``nn.Module`` built as ``factory(student=ModelInfo, teacher=ModelInfo, num_classes=C,
num_train=N_train, num_views=V, **options)`` from ``dmlkd.registry.TRANSFER_METHODS``. Its ``forward``
compares the trainable student's ``ModelOutput`` with the frozen teacher's for the same (augmented) batch
and returns *named, already weighted* loss terms; the trainer sums them into ``loss`` and logs each one.
Trainable state (FitNet regressors, CRD heads and memory, Proxy-Anchor proxies) lives in the method, so it
is optimised through :meth:`TransferMethod.parameter_groups` and saved with the method's ``state_dict``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from dmlkd.data.batch import Batch
from dmlkd.errors import ConfigError, choices
from dmlkd.models.outputs import ModelOutput
from dmlkd.teacher.proxy_anchor import ProxyAnchorLoss, check_real

__all__ = ["ModelInfo", "ProxyAnchorTerm", "TransferMethod", "check_count", "check_weight"]

# The arguments every method takes before its own options; they never count as options.
_COMMON_ARGUMENTS = ("self", "student", "teacher", "num_classes", "num_train", "num_views")


@dataclass(frozen=True)
class ModelInfo:
    """What a transfer method needs to know about one network.

    Attributes:
        embedding_dim: width ``D`` of ``ModelOutput.embedding``.
        pooled_dim: width of ``ModelOutput.pooled`` (the pooled backbone feature, CRD's input).
        tap_channels: channels of the stage maps returned with ``with_features=True``, in network order.
        arch: architecture name (``resnet18``, ``bn_inception``, ...), used in error messages and to know
            the taps' spatial strides.
    """

    embedding_dim: int
    pooled_dim: int
    tap_channels: tuple[int, ...]
    arch: str
    tap_strides: tuple[int, ...] | None = None  # known for timm backbones (from feature_info)
    tap_kind: str = "conv"  # "tokens": ViT patch tokens laid out as maps, not convolutional stage maps

    @classmethod
    def from_model(cls, model: Any) -> ModelInfo:
        """Describe an ``EmbeddingNet`` (anything with ``embedding_dim``, ``pooled_dim``, ``tap_channels``
        and ``config.arch``)."""
        strides = getattr(model, "tap_strides", None)
        return cls(
            embedding_dim=int(model.embedding_dim),
            pooled_dim=int(model.pooled_dim),
            tap_channels=tuple(int(c) for c in model.tap_channels),
            arch=str(model.config.arch),
            tap_strides=tuple(int(s) for s in strides) if strides else None,
            tap_kind=str(getattr(model, "tap_kind", "conv")),
        )


def check_weight(name: str, value: float) -> float:
    """A loss weight or other non-negative finite real (0 switches a term off)."""
    return check_real(name, value, 0.0, closed=True)


def check_count(name: str, value: int, low: int = 1) -> int:
    """An integer option ``>= low``; raises a one-line ConfigError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


class TransferMethod(nn.Module):
    """Base class of the stage-2 losses: student vs frozen teacher on the same batch.

    Class attributes tell the trainer what to produce:
        needs_features: both models must return their stage maps (``forward(..., with_features=True)``).
        needs_pooled: the method reads ``ModelOutput.pooled`` of both sides (CRD).
        cacheable: the teacher side may be replayed from an embedding cache (``features`` None, and
            ``pooled`` None unless the cache holds it; a method with ``needs_pooled`` then needs a cache
            that stores the pooled feature).
        uses_labels: the method reads ``batch.labels`` (label-free methods ignore them).
        method_name: the name under which the method is registered.
        parameter_group_name: the optimiser group of the method's own parameters other than proxies.

    Unknown options raise a one-line ``ConfigError`` listing the valid ones, before ``__init__`` runs.
    """

    needs_features: ClassVar[bool] = False
    needs_pooled: ClassVar[bool] = False
    cacheable: ClassVar[bool] = True
    uses_labels: ClassVar[bool] = False
    method_name: ClassVar[str] = "transfer"
    parameter_group_name: ClassVar[str] = "transfer"

    def __new__(cls, *args: Any, **kwargs: Any) -> TransferMethod:
        options = cls.options()
        unknown = sorted(set(kwargs) - set(options) - set(_COMMON_ARGUMENTS))
        if unknown:
            raise ConfigError(
                f"unknown option {unknown[0]!r} for transfer method {cls.method_name!r}; "
                f"valid options: {choices(options) or 'none'}"
            )
        return super().__new__(cls)

    def __init__(
        self, student: ModelInfo, teacher: ModelInfo, num_classes: int, num_train: int, num_views: int
    ) -> None:
        super().__init__()
        self.student_info = student
        self.teacher_info = teacher
        self.num_classes = check_count("num_classes", num_classes, 1)
        self.num_train = check_count("num_train", num_train, 1)
        self.num_views = check_count("num_views", num_views, 1)

    @classmethod
    def options(cls) -> dict[str, Any]:
        """The method's options (constructor keywords beyond the common ones) and their defaults."""
        parameters = inspect.signature(cls.__init__).parameters.values()
        return {
            p.name: p.default
            for p in parameters
            if p.name not in _COMMON_ARGUMENTS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }

    def set_train_labels(self, labels: Tensor) -> None:
        """Give the method the ``(num_train,)`` labels of the training set in dataset-index order.

        The trainer calls it once after construction (before loading a resumed state). Only methods that
        sample by class (CRD's negatives) use it; the default does nothing.
        """

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        """Return the named, weighted loss terms of one batch (scalars; the student side carries grad).

        Args:
            student: the student's output for ``batch.images`` (raw embedding, pooled, maybe features).
            teacher: the frozen teacher's output for the same images, or its cached replay; no gradient
                ever reaches its tensors.
            batch: the batch (view-major rows: row ``i + v * B`` is view ``v`` of image ``i``).
        """
        raise NotImplementedError

    def parameter_groups(self) -> list[tuple[str, list[nn.Parameter], float]]:
        """``(name, parameters, lr multiplier)`` of the method's trainable parameters; empty groups left out.

        Proxies of a composed Proxy-Anchor loss go in ``"proxies"`` at ``ProxyAnchorLoss.lr_multiplier``;
        every other trainable parameter goes in :attr:`parameter_group_name` at 1.
        """
        proxy_ids = {
            id(p) for module in self.modules() if isinstance(module, ProxyAnchorLoss) for p in module.parameters()
        }
        proxies = [p for p in self.parameters() if id(p) in proxy_ids and p.requires_grad]
        others = [p for p in self.parameters() if id(p) not in proxy_ids and p.requires_grad]
        groups = [
            (self.parameter_group_name, others, 1.0),
            ("proxies", proxies, ProxyAnchorLoss.lr_multiplier),
        ]
        return [group for group in groups if group[1]]


class ProxyAnchorTerm(TransferMethod):
    """A method with the Proxy-Anchor label term of the KD baselines (seed-spec §2.7–2.9).

    Proxy-Anchor (α=32, δ=0.1) runs on the student's raw embedding with one proxy per class; the proxies are
    trained at ``lr × ProxyAnchorLoss.lr_multiplier`` (×100), as in the reference.
    """

    uses_labels: ClassVar[bool] = True

    def _init_proxy_anchor(self, pa_weight: float, pa_margin: float, pa_alpha: float) -> None:
        self.pa_weight = check_weight("pa_weight", pa_weight)
        self.proxy_anchor = ProxyAnchorLoss(
            self.num_classes, self.student_info.embedding_dim, margin=pa_margin, alpha=pa_alpha
        )

    def proxy_anchor_term(self, student: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        """``{"proxy_anchor": pa_weight · ProxyAnchor(student.embedding, labels)}``."""
        return {"proxy_anchor": self.pa_weight * self.proxy_anchor(student.embedding, batch.labels)}
