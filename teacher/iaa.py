"""Intra-class adaptive augmentation (IAA) with neighbour correction around a pair-based stage-1 loss.

Fu et al., "Intra-class Adaptive Augmentation with Neighbor Correction for Deep Metric Learning", IEEE TMM 2022.
The math, as the authors' code computes it (our own implementation):

1. Per-class diagonal statistics of the embeddings: for class ``c`` a mean ``mu_c``, a variance ``var_c`` and a
   count ``n_c``. A batch with ``m`` samples of ``c`` (batch mean ``a``, variance ``v``) is merged with weight
   ``w = max(m / (m + n_c), 1 - momentum)``: ``var_c <- (1 - w) var_c + w v + w (1 - w) (mu_c - a)^2`` and
   ``mu_c <- (1 - w) mu_c + w a`` (``momentum`` = 0.2 keeps the estimate following the moving embedding).
2. Neighbour correction, recomputed at the start of every epoch: a class with few samples gets the weight
   ``u_c = 1 / (1 + log(1 + beta (n_c - 1)))`` (0 when ``n_c >= count_limit``) and the corrected variance
   ``var'_c = (1 - u_c) var_c + u_c gamma var_global + u_c (1 - gamma) var_neigh(c)``, where ``var_global`` is the
   count-weighted mean variance and ``var_neigh(c)`` a weighted mean over the ``neighbors`` classes whose means
   are nearest, weights ``exp(-d_mean^2 / 2 - d_var^2 / 2) * n_k`` with min-max normalised distances.
3. Synthetic samples: each raw embedding ``x`` of class ``c`` spawns ``aug_num`` samples
   ``x + sqrt(lambda_t) * sqrt(var'_c) * eps``, ``eps ~ N(0, I)``; ``lambda_t`` is ``intra_lambda`` scaled by 1.0,
   0.9, 0.75, 0.6 over the four training phases ending at 40, 60, 80 and 100 % of the epochs. Real and synthetic
   samples are L2-normalised and the base loss (multi-similarity or contrastive) sees them together, synthetic
   ones carrying their source's label. Synthesis starts after ``start_epoch``.

Differences from the authors' code, on purpose: it applies the square root to the variance once per synthetic
copy (theirs takes it again for every extra copy, so copies 2.. use var^(1/4), var^(1/8), ...), and it always
uses the corrected variance (theirs computes the correction for large datasets only).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dmlkd.errors import ConfigError
from dmlkd.teacher.config import IAAConfig

_PHASES = ((0.4, 1.0), (0.6, 0.9), (0.8, 0.75), (math.inf, 0.6))


def lambda_schedule(intra_lambda: float, epoch: int, epochs: int) -> float:
    """``intra_lambda`` scaled down in four phases of training (1.0, 0.9, 0.75, 0.6)."""
    ratio = epoch / max(epochs, 1)
    return intra_lambda * next(scale for limit, scale in _PHASES if ratio <= limit)


def _minmax(values: Tensor) -> Tensor:
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else torch.zeros_like(values)


def _check_settings(settings: IAAConfig) -> None:
    """Refuse negative counts and scales, and a momentum or gamma outside [0, 1], in one line."""
    lowest = min(settings.intra_lambda, settings.aug_num, settings.start_epoch, settings.beta, settings.neighbors)
    if lowest < 0 or not 0 <= settings.momentum <= 1 or not 0 <= settings.gamma <= 1:
        raise ConfigError(
            "IAA options out of range: need intra_lambda, aug_num, start_epoch, beta, neighbors >= 0 and "
            f"momentum, gamma in [0, 1]; got {settings.intra_lambda}, {settings.aug_num}, {settings.start_epoch}, "
            f"{settings.beta}, {settings.neighbors}, {settings.momentum}, {settings.gamma}"
        )


class IntraClassAugmentation(nn.Module):
    """Wraps ``base`` (``forward(embeddings, labels) -> scalar``) with IAA synthetic samples.

    Call ``set_epoch(epoch, epochs)`` at the start of every epoch (the teacher trainer does): it refreshes the
    neighbour-corrected variances and the lambda schedule. All statistics are buffers, saved with the loss.
    """

    def __init__(self, base: nn.Module, num_classes: int, embedding_dim: int, seed: int = 0, **options: Any) -> None:
        """``options`` are the fields of ``IAAConfig`` (``intra_lambda``, ``aug_num``, ...); its defaults apply.

        The defaults live in the config dataclass only, so a run configured without IAA options and a module
        built without them agree; an unknown option raises ``TypeError`` as an unknown keyword would.
        """
        super().__init__()
        settings = dataclasses.replace(IAAConfig(), **options)
        _check_settings(settings)
        self.base = base
        self.intra_lambda, self.aug_num = float(settings.intra_lambda), int(settings.aug_num)
        self.start_epoch, self.momentum = int(settings.start_epoch), float(settings.momentum)
        self.beta, self.gamma = float(settings.beta), float(settings.gamma)
        self.neighbors, self.count_limit, self.seed = int(settings.neighbors), int(settings.count_limit), int(seed)
        self.lr_multiplier = getattr(base, "lr_multiplier", 1.0)
        self.register_buffer("class_mean", torch.zeros(num_classes, embedding_dim))
        self.register_buffer("class_var", torch.zeros(num_classes, embedding_dim))
        self.register_buffer("class_count", torch.zeros(num_classes))
        self.register_buffer("corrected_var", torch.zeros(num_classes, embedding_dim))
        self.register_buffer("current_lambda", torch.zeros(()))
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update_statistics(self, embeddings: Tensor, labels: Tensor) -> None:
        """Merge one batch of raw embeddings into the per-class mean and variance (see the module docstring)."""
        points = embeddings.detach().float()
        for label in labels.unique():
            rows = points[labels == label]
            batch_mean, batch_var = rows.mean(dim=0), rows.var(dim=0, unbiased=False)
            count = float(rows.shape[0])
            weight = max(count / (count + float(self.class_count[label])), 1.0 - self.momentum)
            extra = weight * (1 - weight) * (self.class_mean[label] - batch_mean).pow(2)
            self.class_var[label] = (1 - weight) * self.class_var[label] + weight * batch_var + extra
            self.class_mean[label] = (1 - weight) * self.class_mean[label] + weight * batch_mean
            self.class_count[label] += count

    @torch.no_grad()
    def refresh_correction(self) -> None:
        """Recompute ``var'_c`` for every class from the current statistics."""
        counts = self.class_count
        seen = counts > 1
        self.corrected_var.copy_(self.class_var)
        if int(seen.sum()) < 2:
            return
        global_var = (self.class_var[seen] * counts[seen, None]).sum(0) / counts[seen].sum()
        mean_dist = torch.cdist(self.class_mean, self.class_mean)
        var_dist = torch.cdist(self.class_var, self.class_var)
        blocked = (~seen)[None, :] | torch.eye(len(counts), dtype=torch.bool, device=counts.device)
        k = min(self.neighbors, int(seen.sum()) - 1)
        if k == 0:
            neighbour_var = self.class_var
        else:
            nearest = mean_dist.masked_fill(blocked, math.inf).topk(k, dim=1, largest=False).indices
            d_mean = torch.stack([_minmax(row)[idx] for row, idx in zip(mean_dist, nearest)])
            d_var = torch.stack([_minmax(row)[idx] for row, idx in zip(var_dist, nearest)])
            weights = torch.exp(-d_mean.pow(2) / 2 - d_var.pow(2) / 2) * counts[nearest]
            neighbour_var = (self.class_var[nearest] * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)
        few = 1.0 / (1.0 + torch.log1p(self.beta * (counts - 1).clamp_min(0))) * (counts < self.count_limit)
        few = few[:, None]
        mixed = (1 - few) * self.class_var + few * (self.gamma * global_var + (1 - self.gamma) * neighbour_var)
        self.corrected_var.copy_(torch.where(seen[:, None], mixed, self.class_var))

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Start of ``epoch`` (0-based): refresh the correction and this epoch's lambda (0 before start_epoch)."""
        self.refresh_correction()
        active = epoch >= self.start_epoch and self.aug_num > 0
        self.current_lambda.fill_(lambda_schedule(self.intra_lambda, epoch + 1, epochs) if active else 0.0)

    def synthesize(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``aug_num`` synthetic copies of every row (gradients flow to ``embeddings``)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.draws))
        self.draws += 1
        scale = float(self.current_lambda) ** 0.5 * self.corrected_var[labels].clamp_min(0).sqrt()
        noise = torch.randn((self.aug_num, *embeddings.shape), generator=generator).to(embeddings)
        synthetic = embeddings.unsqueeze(0) + noise * scale.to(embeddings)
        return synthetic.reshape(-1, embeddings.shape[1]), labels.repeat(self.aug_num)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if self.training:
            self.update_statistics(embeddings, labels)
        if not self.training or float(self.current_lambda) == 0.0:
            return self.base(F.normalize(embeddings.float(), dim=1), labels)
        synthetic, synthetic_labels = self.synthesize(embeddings.float(), labels)
        points = F.normalize(torch.cat([embeddings.float(), synthetic]), dim=1)
        return self.base(points, torch.cat([labels, synthetic_labels]))
