"""The contract every embedding-transfer method implements (seed-spec §2.5–2.14).

A method is an ``nn.Module`` built as ``TRANSFER_METHODS.build(name, TransferContext(...), **options)``
(``dmlkd.registry``), one file per method in ``dmlkd.transfer.methods`` registered with a decorator; its
options are its annotated keyword parameters after ``context``, checked by the registry. Its ``forward``
compares the trainable student's ``ModelOutput`` with the frozen teacher's for the same (augmented) batch
and returns *named, already weighted* loss terms; the trainer sums them into ``loss`` and logs each one.
Trainable state (FitNet regressors, CRD heads and memory, Proxy-Anchor proxies) lives in the method, so it
is optimised through :meth:`TransferMethod.parameter_groups` and saved with the method's ``state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from dmlkd.data.batch import Batch
from dmlkd.models.outputs import ModelOutput
from dmlkd.numerics import check_count, check_real
from dmlkd.teacher.losses.proxy_anchor import ProxyAnchorLoss

__all__ = ["ModelInfo", "ProxyAnchorTerm", "TransferContext", "TransferMethod", "check_weight"]


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


@dataclass(frozen=True)
class TransferContext:
    """What every transfer method is built for: the two networks and the training set's sizes.

    Attributes:
        student: the trainable student.
        teacher: the frozen teacher.
        num_classes: training classes C (label-using methods' proxies).
        num_train: training images N (CRD's memory banks).
        num_views: augmented views V per image in a batch (view-major rows).
    """

    student: ModelInfo
    teacher: ModelInfo
    num_classes: int
    num_train: int
    num_views: int

    def __post_init__(self) -> None:
        for name in ("num_classes", "num_train", "num_views"):
            check_count(name, getattr(self, name), 1)


def check_weight(name: str, value: float) -> float:
    """A loss weight or other non-negative finite real (0 switches a term off)."""
    return check_real(name, value, 0.0, closed=True)


class TransferMethod(nn.Module):
    """Base class of the stage-2 losses: student vs frozen teacher on the same batch.

    Class attributes tell the trainer what to produce:
        needs_features: both models must return their stage maps (``forward(..., with_features=True)``).
        needs_pooled: the method reads ``ModelOutput.pooled`` of both sides (CRD).
        cacheable: the teacher side may be replayed from an embedding cache (``features`` None, and
            ``pooled`` None unless the cache holds it; a method with ``needs_pooled`` then needs a cache
            that stores the pooled feature).
        uses_labels: the method reads ``batch.labels`` (label-free methods ignore them).
        parameter_group_name: the optimiser group of the method's own parameters other than proxies.

    A subclass takes ``context`` first, then its options as annotated keyword parameters with defaults.
    """

    needs_features: ClassVar[bool] = False
    needs_pooled: ClassVar[bool] = False
    cacheable: ClassVar[bool] = True
    uses_labels: ClassVar[bool] = False
    parameter_group_name: ClassVar[str] = "transfer"

    def __init__(self, context: TransferContext) -> None:
        super().__init__()
        self.context = context
        self.student_info = context.student
        self.teacher_info = context.teacher
        self.num_classes = context.num_classes
        self.num_train = context.num_train
        self.num_views = context.num_views

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

    A subclass passes ``**proxy_anchor`` on to this ``__init__``; the registry counts ``pa_weight``,
    ``pa_margin`` and ``pa_alpha`` among its options, and it builds the loss with :meth:`_init_proxy_anchor`
    where its proxies should draw from the random generator.
    """

    uses_labels: ClassVar[bool] = True

    def __init__(
        self, context: TransferContext, pa_weight: float = 1.0, pa_margin: float = 0.1, pa_alpha: float = 32.0
    ) -> None:
        super().__init__(context)
        self.pa_weight = check_weight("pa_weight", pa_weight)
        self._proxy_anchor_options = {"margin": pa_margin, "alpha": pa_alpha}

    def _init_proxy_anchor(self) -> None:
        self.proxy_anchor = ProxyAnchorLoss(
            self.num_classes, self.student_info.embedding_dim, **self._proxy_anchor_options
        )

    def proxy_anchor_term(self, student: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        """``{"proxy_anchor": pa_weight · ProxyAnchor(student.embedding, labels)}``."""
        return {"proxy_anchor": self.pa_weight * self.proxy_anchor(student.embedding, batch.labels)}
