# Proxy-Anchor loss: S. Kim, D. Kim, M. Cho, S. Kwak, "Proxy Anchor Loss for Deep Metric Learning", CVPR 2020
# (arXiv:2003.13911). Definitions follow the official code as described in seed-spec §2.1.
"""Proxy-Anchor loss with one learnable proxy per class."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmlkd.numerics import autocast_disabled, check_real, compute_dtype, l2_normalize, masked_softplus_logsumexp
from dmlkd.registry import TEACHER_LOSSES
from dmlkd.teacher.losses.base import check_batch, check_class_count


@TEACHER_LOSSES.register("proxy_anchor")
class ProxyAnchorLoss(nn.Module):
    """Proxy-Anchor loss with one learnable proxy per class.

    ``L = 1/|P⁺| Σ_{p∈P⁺} log(1 + Σ_{x∈X_p⁺} e^{−α(c(x,p) − δ)})``
    ``  + 1/C Σ_{p} log(1 + Σ_{x∈X_p⁻} e^{α(c(x,p) + δ)})``
    where c is the cosine between the L2-normalised embedding and proxy, P⁺ the proxies whose class occurs
    in the batch, and the negative term is averaged over all C proxies as in the official code. The loss is
    computed as softplus(logsumexp) in at least float32 with autocast disabled, so it stays finite when the
    backbone runs under fp16/bf16 autocast.

    Args:
        num_classes: number of training classes C (>= 2).
        embedding_dim: embedding width D.
        margin: δ (official default 0.1, ``--mrg``).
        alpha: α, the scale (official default 32, ``--alpha``).
    """

    lr_multiplier: float = 100.0  # PA:code/train.py puts the proxies at lr × 100

    def __init__(self, num_classes: int, embedding_dim: int, margin: float = 0.1, alpha: float = 32.0) -> None:
        super().__init__()
        check_class_count(num_classes, embedding_dim)
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.margin = check_real("proxy_anchor margin", margin, 0.0, 1.0, closed=True)
        self.alpha = check_real("proxy_anchor alpha", alpha, 0.0)
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal with mode fan_out: for a (C, D) tensor fan_out = C, so entries ~ N(0, 2/C)."""
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
            f"margin={self.margin}, alpha={self.alpha}"
        )

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss of a batch.

        Args:
            embeddings: (N, D) raw (unnormalised) embeddings; gradients flow into them and the proxies.
            labels: (N,) integer class indices in ``0..C-1``.
        """
        check_batch(embeddings, labels, self.num_classes, self.embedding_dim)
        dtype = compute_dtype(embeddings, self.proxies)
        with autocast_disabled(embeddings.device):
            cosine = l2_normalize(embeddings.to(dtype)) @ l2_normalize(self.proxies.to(dtype)).T  # (N, C)
            positive = F.one_hot(labels.long(), self.num_classes).bool()  # (N, C)
            pos_terms = masked_softplus_logsumexp(-self.alpha * (cosine - self.margin), positive, dim=0)
            neg_terms = masked_softplus_logsumexp(self.alpha * (cosine + self.margin), ~positive, dim=0)
            num_with_positives = positive.any(dim=0).sum()  # >= 1 for a non-empty batch
            return pos_terms.sum() / num_with_positives + neg_terms.sum() / self.num_classes
