# CRD: Y. Tian, D. Krishnan, P. Isola, "Contrastive Representation Distillation", ICLR 2020, as wired into the
# LabelRelaxation code (label-aware negatives, Proxy-Anchor added; seed-spec §2.9, §10.13).
"""Contrastive representation distillation with two memory banks, plus Proxy-Anchor on the student."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmlkd.data.batch import Batch
from dmlkd.errors import ConfigError, DataError
from dmlkd.models.outputs import ModelOutput
from dmlkd.numerics import autocast_disabled, check_count, check_real
from dmlkd.registry import TRANSFER_METHODS
from dmlkd.transfer.base import ProxyAnchorTerm, TransferContext, check_weight

NCE_EPS = 1e-7  # the reference's eps in both NCE log terms


def nce_loss(probabilities: Tensor, noise_mass: float, eps: float = NCE_EPS) -> Tensor:
    """The reference's NCE loss of one side (seed-spec §2.9).

    With P = o / Z (column 0 the positive, columns 1..K the negatives) and m·Pn = ``noise_mass``:
    L = −(1/N) [Σ_i log(P_i0 / (P_i0 + m·Pn + eps)) + Σ_{i, k≥1} log(m·Pn / (P_ik + m·Pn + eps))].

    Args:
        probabilities: (N, K + 1) normalised scores P.
        noise_mass: m·Pn = K / n_data.
        eps: added to both denominators.
    """
    positive = probabilities[:, 0]
    negative = probabilities[:, 1:]
    log_positive = torch.log(positive / (positive + noise_mass + eps))
    log_negative = torch.log(noise_mass / (negative + noise_mass + eps))
    return -(log_positive.sum() + log_negative.sum()) / probabilities.shape[0]


@torch.no_grad()
def momentum_update(memory: Tensor, indices: Tensor, features: Tensor, momentum: float) -> Tensor:
    """A copy of ``memory`` with ``memory[j] ← normalize(m · memory[j] + (1 − m) · mean_{i: idx_i = j} f_i)``.

    Rows that share an index (the V views of an image, or an image drawn twice) are averaged first, so each
    slot is written once and the result does not depend on write order (the reference's duplicate
    ``index_copy_`` keeps an arbitrary view). The average is a dense one-hot matmul, deterministic on GPU.
    The update is out of place because the loss's backward still needs the old bank.

    Args:
        memory: (num_train, F) bank; left unchanged.
        indices: (N,) dataset indices of the rows.
        features: (N, F) unit-norm features (detached).
        momentum: weight m of the old entry.

    Returns:
        The updated (num_train, F) bank.
    """
    unique, inverse = torch.unique(indices, return_inverse=True)
    assignment = F.one_hot(inverse, unique.numel()).t().to(memory.dtype)  # (U, N)
    mean = (assignment @ features.to(memory.dtype)) / assignment.sum(dim=1, keepdim=True)
    mixed = momentum * memory.index_select(0, unique) + (1.0 - momentum) * mean
    return memory.index_copy(0, unique, mixed / mixed.norm(dim=1, keepdim=True))


def _step_seed(seed: int, step: int) -> int:
    """A well-mixed 63-bit seed for draw number ``step``: draws are reproducible and resumable by count."""
    state = np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)


@TRANSFER_METHODS.register("crd")
class CRD(ProxyAnchorTerm):
    """CRD on the pooled features (heads ``Linear(pooled_dim → 128)`` + L2 norm) + Proxy-Anchor.

    Two banks hold one 128-d entry per training image: ``memory_student`` (student head outputs v_s) and
    ``memory_teacher`` (teacher head outputs v_t), both started ~U(−stdv, stdv), stdv = 1/sqrt(128/3). For
    each row, column 0 of the contrast indices is its own image and columns 1..K are ``nce_k`` images of
    *other classes* (the reference's label-aware variant), drawn uniformly with replacement by rejection
    sampling (see :meth:`sample_contrast_indices`). Scores o = exp(⟨M[idx], v⟩ / T) against the *other*
    side's bank are divided by Z, set once from the first batch as mean(o)·n_data and kept in a buffer, and
    fed to :func:`nce_loss`. n_data is the reference's ``len(train) × V``; it only enters Z and Pn = 1/n_data,
    where it cancels up to the 1e-7 eps, so the banks hold just ``context.num_train`` rows. After the loss, in
    training mode, both banks get a :func:`momentum_update`. Both heads train (group ``"crd_heads"``); the
    teacher's pooled feature itself is detached.

    The teacher side may come from a cache only if the cache holds the pooled feature (``cacheable`` with
    ``needs_pooled``). Call :meth:`set_train_labels` before the first batch.

    Returns ``{"crd_student_anchor": weight · L_s, "crd_teacher_anchor": weight · L_t, "proxy_anchor": ...}``
    (L_s: student feature against the teacher bank, the reference's ``out_v1``).

    Args:
        feature_dim: width of the heads' output and of the bank entries.
        nce_k: negatives per row K.
        nce_t: temperature T.
        momentum: bank momentum (weight of the old entry).
        weight: weight of each CRD side.
        seed: seed of the bank initialisation and of the negative draws.
        max_rejection_rounds: rounds of redrawing same-class negatives before the exact fallback.
        pa_weight: weight of the Proxy-Anchor term.
        pa_margin: Proxy-Anchor δ.
        pa_alpha: Proxy-Anchor α.
    """

    needs_pooled = True
    parameter_group_name = "crd_heads"

    def __init__(
        self,
        context: TransferContext,
        feature_dim: int = 128,
        nce_k: int = 4096,
        nce_t: float = 0.07,
        momentum: float = 0.5,
        weight: float = 1.0,
        seed: int = 0,
        max_rejection_rounds: int = 4,
        **proxy_anchor: float,
    ) -> None:
        super().__init__(context, **proxy_anchor)
        self.feature_dim = check_count("feature_dim", feature_dim)
        self.nce_k = check_count("nce_k", nce_k)
        self.nce_t = check_real("nce_t", nce_t, 0.0)
        self.momentum = check_real("momentum", momentum, 0.0, 1.0, closed=True)
        self.weight = check_weight("weight", weight)
        self.seed = check_count("seed", seed, 0)
        self.max_rejection_rounds = check_count("max_rejection_rounds", max_rejection_rounds, 0)
        self.noise_size = context.num_train * context.num_views  # the reference's n_data
        self.student_head = nn.Linear(context.student.pooled_dim, feature_dim)
        self.teacher_head = nn.Linear(context.teacher.pooled_dim, feature_dim)
        generator = torch.Generator().manual_seed(seed)
        stdv = 1.0 / math.sqrt(feature_dim / 3.0)
        for name in ("memory_student", "memory_teacher"):
            bank = torch.rand(context.num_train, feature_dim, generator=generator) * (2.0 * stdv) - stdv
            self.register_buffer(name, bank)
        self.register_buffer("z_student", torch.tensor(-1.0))  # < 0: not set yet
        self.register_buffer("z_teacher", torch.tensor(-1.0))
        self.register_buffer("draws", torch.tensor(0, dtype=torch.long))  # negative draws made so far
        self.register_buffer("train_labels", torch.full((context.num_train,), -1, dtype=torch.long))
        self.register_buffer("label_order", torch.arange(context.num_train))  # dataset indices sorted by label
        self.register_buffer("class_start", torch.zeros(context.num_classes, dtype=torch.long))  # in label_order
        self.register_buffer("class_count", torch.zeros(context.num_classes, dtype=torch.long))
        self._init_proxy_anchor()
        self._generator: torch.Generator | None = None
        self._labels_checked = False

    def extra_repr(self) -> str:
        return (
            f"num_train={self.num_train}, feature_dim={self.feature_dim}, nce_k={self.nce_k}, "
            f"nce_t={self.nce_t}, momentum={self.momentum}, weight={self.weight}, pa_weight={self.pa_weight}"
        )

    # --- Labels and negatives.

    def set_train_labels(self, labels: Tensor) -> None:
        """Store the ``(num_train,)`` training labels (dataset order) that the negative draws reject by."""
        labels = torch.as_tensor(labels)
        if labels.shape != (self.num_train,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise DataError(
                f"crd needs {self.num_train} integer training labels, got {labels.dtype} of shape {tuple(labels.shape)}"
            )
        labels = labels.to(device=self.train_labels.device, dtype=torch.long)
        low, high = (int(v) for v in torch.aminmax(labels))
        if low < 0 or high >= self.num_classes:
            raise DataError(f"training labels must lie in 0..{self.num_classes - 1}, got {low}..{high}")
        counts = torch.bincount(labels, minlength=self.num_classes)
        self.train_labels.copy_(labels)
        self.label_order.copy_(torch.argsort(labels, stable=True))
        self.class_count.copy_(counts)
        self.class_start.copy_(torch.cumsum(counts, dim=0) - counts)
        self._labels_checked = True

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if not self._labels_checked:
            if bool((self.train_labels < 0).any()):
                raise RuntimeError("crd: call set_train_labels(labels) before the first batch")
            self._labels_checked = True
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        step = int(self.draws)
        self.draws.add_(1)
        return self._generator.manual_seed(_step_seed(self.seed, step))

    def _other_class_fallback(self, labels: Tensor, current: Tensor, generator: torch.Generator) -> Tensor:
        """A uniform draw from the images whose label differs from each entry of ``labels`` (exact, no
        rejection): position u among the ``num_train − count`` others skips the label's block in
        ``label_order``. Entries whose label covers the whole training set keep ``current``."""
        count = self.class_count[labels]
        start = self.class_start[labels]
        others = self.num_train - count
        uniform = torch.rand(labels.shape, generator=generator, device=labels.device)
        position = torch.minimum((uniform * others).long(), (others - 1).clamp(min=0))
        position = torch.where(position < start, position, position + count).clamp(max=self.num_train - 1)
        return torch.where(others > 0, self.label_order[position], current)

    def sample_contrast_indices(self, indices: Tensor, labels: Tensor) -> Tensor:
        """``(N, nce_k + 1)`` dataset indices: column 0 the row's own index, then ``nce_k`` negatives.

        Negatives are uniform with replacement over the images of other classes: draw uniformly over all
        ``num_train`` images, redraw the entries that share the anchor's label, up to
        ``max_rejection_rounds`` times or until none is left, then draw any entries still left exactly from
        the other classes. Draw number n uses a generator seeded from ``(seed, n)`` on the batch's device, so
        the draws are deterministic for a seed and resume exactly (``draws`` is saved).
        """
        generator = self._generator_for(indices.device)
        anchors = labels.long().unsqueeze(1).expand(-1, self.nce_k)
        size = anchors.shape
        negatives = torch.randint(self.num_train, size, generator=generator, device=indices.device)
        clash = self.train_labels[negatives] == anchors
        for _ in range(self.max_rejection_rounds):
            remaining = int(clash.sum())
            if remaining == 0:
                break
            redraw = torch.randint(self.num_train, (remaining,), generator=generator, device=indices.device)
            negatives[clash] = redraw
            clash = self.train_labels[negatives] == anchors
        if bool(clash.any()):
            negatives[clash] = self._other_class_fallback(anchors[clash], negatives[clash], generator)
        return torch.cat([indices.long().unsqueeze(1), negatives], dim=1)

    def _contrast_per_image(self, indices: Tensor, labels: Tensor) -> Tensor:
        """One index and one set of negatives per image, shared by its V views (view-major rows), as the
        reference's ``__getitem__`` draws them once per sample and returns them with every view."""
        views, rows = self.num_views, indices.shape[0]
        if views == 1:
            return self.sample_contrast_indices(indices, labels)
        if rows % views:
            raise ValueError(f"crd got {rows} rows, not a multiple of its {views} views (view-major batches)")
        images = rows // views
        if not torch.equal(indices.view(views, images), indices[:images].expand(views, images)):
            raise ValueError("crd needs view-major batches: row i + v * B is view v of image i")
        return self.sample_contrast_indices(indices[:images], labels[:images]).repeat(views, 1)

    # --- Loss.

    def _scores(self, memory: Tensor, features: Tensor, contrast: Tensor) -> Tensor:
        """o_ik = exp(⟨memory[contrast_ik], features_i⟩ / T); the bank is a constant."""
        return torch.exp((features @ memory.t()).gather(1, contrast) / self.nce_t)

    @torch.no_grad()
    def _normaliser(self, buffer: Tensor, scores: Tensor) -> Tensor:
        """Z: kept once set (> 0), else set now to mean(o)·n_data; without a host sync."""
        value = torch.where(buffer > 0, buffer, (scores.mean() * self.noise_size).to(buffer.dtype))
        buffer.copy_(value)
        return value

    def _check_indices(self, indices: Tensor) -> None:
        low, high = (int(v) for v in torch.aminmax(indices))
        if low < 0 or high >= self.num_train:
            raise DataError(
                f"crd got dataset index {low if low < 0 else high} but was built for num_train="
                f"{self.num_train} (valid 0..{self.num_train - 1}); build it with the training set's size"
            )

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        if teacher.pooled is None:
            raise ConfigError(
                "crd needs the teacher's pooled feature, which this embedding cache does not hold; "
                "cache pooled features or run the teacher online"
            )
        indices = batch.indices.long()
        self._check_indices(indices)
        contrast = self._contrast_per_image(indices, batch.labels)
        dtype = self.student_head.weight.dtype
        with autocast_disabled(indices.device):
            student_features = F.normalize(self.student_head(student.pooled.to(dtype)), p=2, dim=1)
            teacher_features = F.normalize(self.teacher_head(teacher.pooled.detach().to(dtype)), p=2, dim=1)
            student_scores = self._scores(self.memory_teacher, student_features, contrast)
            teacher_scores = self._scores(self.memory_student, teacher_features, contrast)
            noise_mass = self.nce_k / self.noise_size
            student_loss = nce_loss(student_scores / self._normaliser(self.z_student, student_scores), noise_mass)
            teacher_loss = nce_loss(teacher_scores / self._normaliser(self.z_teacher, teacher_scores), noise_mass)
        if self.training:
            self.memory_student = momentum_update(self.memory_student, indices, student_features, self.momentum)
            self.memory_teacher = momentum_update(self.memory_teacher, indices, teacher_features, self.momentum)
        return {
            "crd_student_anchor": self.weight * student_loss,
            "crd_teacher_anchor": self.weight * teacher_loss,
            **self.proxy_anchor_term(student, batch),
        }
