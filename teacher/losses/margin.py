# Margin loss with distance-weighted negative sampling: C.-Y. Wu, R. Manmatha, A. J. Smola, P. Krähenbühl,
# "Sampling Matters in Deep Embedding Learning", ICCV 2017 (arXiv:1706.07567). Defaults (α=0.2, β=1.2, ν=0,
# cut-off 0.5, non-zero-loss cut-off 1.4, pair-count normalisation) follow the paper and the Divide-and-Conquer
# code (A. Sanakoyeu et al., CVPR 2019) that the seed-spec's DC README describes.
"""Margin loss with a learnable boundary β and distance-weighted negative sampling, reproducible by seed."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dmlkd.numerics import autocast_disabled, check_count, check_real, compute_dtype, l2_normalize
from dmlkd.registry import TEACHER_LOSSES
from dmlkd.teacher.losses.base import check_batch, check_class_count, check_pair_batch, euclidean_distances, pair_masks


def inverse_sphere_density(distances: torch.Tensor, dim: int, cutoff: float) -> torch.Tensor:
    """Return ``log 1/q(d)`` for distances between points uniform on the unit sphere in R^dim (up to a constant).

    ``q(d) ∝ d^{dim−2} (1 − d²/4)^{(dim−3)/2}``; d is clamped below at ``cutoff`` (Wu et al. §4).
    """
    d = distances.clamp_min(cutoff)
    one_minus = (1.0 - 0.25 * d.pow(2)).clamp_min(torch.finfo(d.dtype).tiny)
    return (2.0 - dim) * d.log() - 0.5 * (dim - 3.0) * one_minus.log()


def distance_weighted_negatives(
    distances: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    dim: int,
    noise: torch.Tensor,
    cutoff: float = 0.5,
    nonzero_loss_cutoff: float = 1.4,
) -> torch.Tensor:
    """Draw each anchor's negatives with probability ∝ 1/q(d), without replacement; return an (N, N) mask.

    Anchor i draws ``min(#positives of i, #admissible negatives of i)`` negatives, where admissible means
    ``d < nonzero_loss_cutoff`` (farther negatives have zero margin loss at the default β + α = 1.4 and are
    never drawn). Sampling is Gumbel-top-k: the k largest ``log(1/q(d)) + noise`` over admissible negatives,
    which is successive sampling ∝ 1/q(d) when ``noise`` is standard Gumbel.

    Args:
        distances: (N, N) Euclidean distances of L2-normalised embeddings (no gradient needed).
        positive: (N, N) bool mask of positive pairs (diagonal excluded).
        negative: (N, N) bool mask of negative pairs.
        dim: embedding width (the sphere's ambient dimension).
        noise: (N, N) standard Gumbel noise, same dtype and device as ``distances``.
        cutoff: distances below it are clamped to it when weighting (variance control, 0.5).
        nonzero_loss_cutoff: negatives at or beyond this distance are not drawn (1.4).
    """
    distances = distances.detach()
    admissible = negative & (distances < nonzero_loss_cutoff)
    keys = (inverse_sphere_density(distances, dim, cutoff) + noise).masked_fill(~admissible, -math.inf)
    counts = torch.minimum(positive.sum(dim=1), admissible.sum(dim=1))
    most = int(counts.max())
    sampled = torch.zeros_like(negative)
    if most == 0:
        return sampled
    chosen = keys.topk(most, dim=1).indices
    take = torch.arange(most, device=counts.device)[None, :] < counts[:, None]
    return sampled.scatter_(1, chosen, take)


def gumbel_noise(shape: tuple[int, int], seed: int, step: int) -> torch.Tensor:
    """Standard Gumbel noise (float64, CPU) drawn from a generator keyed by ``(seed, step)`` alone."""
    key = int(np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0])
    generator = torch.Generator().manual_seed(key)
    uniform = torch.rand(shape, generator=generator, dtype=torch.float64).clamp_min(1e-300)
    return -torch.log(-torch.log(uniform))


def margin_terms(
    distances: torch.Tensor, positive: torch.Tensor, sampled: torch.Tensor, beta_rows: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (sum of pair losses, number of non-zero pair losses).

    Positive pairs (i, j) cost ``relu(d_ij − β_i + α)``, drawn negative pairs (i, k) ``relu(β_i − d_ik + α)``,
    where β_i is anchor i's boundary (``beta_rows``, shape (N,)).
    """
    beta = beta_rows[:, None]
    pos_loss = F.relu(distances - beta + alpha) * positive
    neg_loss = F.relu(beta - distances + alpha) * sampled
    return pos_loss.sum() + neg_loss.sum(), (pos_loss > 0).sum() + (neg_loss > 0).sum()


@TEACHER_LOSSES.register("margin")
class MarginLoss(nn.Module):
    """Margin loss of Wu et al. on Euclidean distances of L2-normalised embeddings.

    Every positive pair of the batch and, per anchor, as many distance-weighted negatives as it has
    positives (``distance_weighted_negatives``) give ``L = (Σ pair losses + ν · R(β)) / #non-zero pair losses``
    (divided by 1 when none is non-zero), with ``R(β) = |β|`` for a global β and ``Σ_i #positives(i) · |β_{y_i}|``
    (one term per anchor-positive pair) for per-class β.

    The noise of step t is drawn from a generator keyed by ``(seed, t)``; t is the buffer ``sampling_step``,
    incremented at each training-mode forward and saved in the state dict, so runs repeat exactly, resume
    included, on any device.

    β is a parameter trained at ``lr × lr_multiplier`` with ``lr_multiplier = 10``: under AdamW at lr 1e-4 it
    moves by at most ~1e-3 per step (up to ~1 over 1,000 steps), fast enough to track the distance
    distributions and small against α. Wu et al. train β with plain SGD at lr 0.1 beside Adam at 1e-4 for
    the network (the ratio does not carry over between optimisers); the Divide-and-Conquer code keeps β fixed
    by default (``learn_beta=False`` here, or ``optim.loss_lr_mult``).

    Args:
        num_classes: number of training classes C (>= 2).
        embedding_dim: embedding width D.
        alpha: the margin α (0.2).
        beta: initial boundary β (1.2).
        nu: weight ν of the β regulariser (0).
        per_class_beta: one β per class (C values) instead of one global β.
        learn_beta: train β (False keeps it at its initial value).
        cutoff: distance clamp of the sampling weights (0.5).
        nonzero_loss_cutoff: negatives at least this far are never drawn (1.4 = β + α).
        seed: seed of the sampling noise.
    """

    lr_multiplier: float = 10.0

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        alpha: float = 0.2,
        beta: float = 1.2,
        nu: float = 0.0,
        per_class_beta: bool = False,
        learn_beta: bool = True,
        cutoff: float = 0.5,
        nonzero_loss_cutoff: float = 1.4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_class_count(num_classes, embedding_dim)
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.alpha = check_real("margin alpha", alpha, 0.0, closed=True)
        self.nu = check_real("margin nu", nu, 0.0, closed=True)
        self.cutoff = check_real("margin cutoff", cutoff, 0.0, 2.0, closed=True)
        self.nonzero_loss_cutoff = check_real("margin nonzero_loss_cutoff", nonzero_loss_cutoff, 0.0)
        self.per_class_beta = per_class_beta
        self.seed = check_count("margin seed", seed, 0)
        initial = check_real("margin beta", beta, 0.0)
        self.beta = nn.Parameter(torch.full((num_classes if per_class_beta else 1,), initial), learn_beta)
        self.register_buffer("sampling_step", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, alpha={self.alpha}, "
            f"nu={self.nu}, per_class_beta={self.per_class_beta}, cutoff={self.cutoff}, "
            f"nonzero_loss_cutoff={self.nonzero_loss_cutoff}, seed={self.seed}"
        )

    def next_noise(self, size: int) -> torch.Tensor:
        """Gumbel noise for this forward pass; advances ``sampling_step`` in training mode."""
        step = int(self.sampling_step)
        if self.training:
            self.sampling_step += 1
        return gumbel_noise((size, size), self.seed, step)

    def regulariser(self, beta_rows: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        """``R(β)``: |β| for a global β, else Σ over anchor-positive pairs of |β| of the anchor's class."""
        if not self.per_class_beta:
            return beta_rows[0].abs()
        return (positive.sum(dim=1) * beta_rows.abs()).sum()

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss of a batch.

        Args:
            embeddings: (N, D) raw embeddings (normalised here); gradients flow into them and into β.
            labels: (N,) integer class indices in ``0..C-1``.
        """
        check_batch(embeddings, labels, self.num_classes, self.embedding_dim)
        check_pair_batch(labels, "margin")
        noise = self.next_noise(labels.shape[0])
        dtype = compute_dtype(embeddings, self.beta)
        with autocast_disabled(embeddings.device):
            distances = euclidean_distances(l2_normalize(embeddings.to(dtype)))
            positive, negative = pair_masks(labels)
            sampled = distance_weighted_negatives(
                distances,
                positive,
                negative,
                self.embedding_dim,
                noise.to(device=distances.device, dtype=dtype),
                self.cutoff,
                self.nonzero_loss_cutoff,
            )
            beta = self.beta.to(dtype)
            beta_rows = beta[labels.long()] if self.per_class_beta else beta.expand(labels.shape[0])
            total, count = margin_terms(distances, positive, sampled, beta_rows, self.alpha)
            total = total + self.nu * self.regulariser(beta_rows, positive)
            return total / count.clamp_min(1)
