# Proxy-Anchor loss: S. Kim, D. Kim, M. Cho, S. Kwak, "Proxy Anchor Loss for Deep Metric Learning", CVPR 2020
# (arXiv:2003.13911). Definitions follow the official code as described in seed-spec §2.1.
"""Proxy-Anchor loss, plus the input checks and fp32 helpers shared by every teacher loss."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dmlkd.errors import ConfigError, DataError

NORM_EPS = 1e-12  # added to the squared norm before the square root (official l2_norm)


# ---------------------------------------------------------------------------------------------------------
# Helpers shared by the teacher losses.


def check_class_count(num_classes: int, embedding_size: int) -> None:
    """Raise a one-line ConfigError unless ``num_classes >= 2`` and ``embedding_size >= 1`` are integers."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if isinstance(embedding_size, bool) or not isinstance(embedding_size, int) or embedding_size < 1:
        raise ConfigError(f"embedding_size must be an integer >= 1, got {embedding_size!r}")


def check_real(name: str, value: float, low: float, high: float = math.inf, closed: bool = False) -> float:
    """Return ``value`` as float if it is a finite real in (low, high), or [low, high) when ``closed``.

    Raises:
        ConfigError: naming the option, the valid interval and the bad value.
    """
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    above_low = valid and (value >= low if closed else value > low)
    if not (above_low and value < high):
        interval = f"{'[' if closed else '('}{low:g}, {high:g})"
        raise ConfigError(f"{name} must be a finite number in {interval}, got {value!r}")
    return float(value)


def check_batch(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int, embedding_size: int) -> None:
    """Validate a (N, D) embedding batch and its (N,) integer labels in [0, num_classes).

    Raises:
        ConfigError: the embedding width differs from the loss's ``embedding_size``.
        DataError: the batch is empty, the shapes disagree, or a label is outside ``0..num_classes-1``.
    """
    if embeddings.dim() != 2 or embeddings.shape[0] == 0:
        raise DataError(f"embeddings must be a non-empty (N, D) batch, got shape {tuple(embeddings.shape)}")
    if embeddings.shape[1] != embedding_size:
        raise ConfigError(
            f"the model outputs {embeddings.shape[1]}-d embeddings but the loss has "
            f"embedding_size={embedding_size}; make them equal"
        )
    if labels.shape != embeddings.shape[:1]:
        raise DataError(f"labels must have shape ({embeddings.shape[0]},), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise DataError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    low, high = (int(v) for v in torch.aminmax(labels.detach()))  # one host sync per step
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise DataError(
            f"label {bad} is out of range for num_classes={num_classes} (valid labels are "
            f"0..{num_classes - 1}); check that num_classes matches the dataset's class count"
        )


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Return the dtype to compute a loss in: float32, or float64 when an input already is float64."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Disable autocast on ``device`` so matmuls run in the dtype of their (float32/64) inputs."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Row-wise ``x / sqrt(||x||² + 1e-12)`` (the official Proxy-Anchor ``l2_norm``)."""
    return x * torch.rsqrt(x.pow(2).sum(dim=1, keepdim=True) + NORM_EPS)


def masked_softplus_logsumexp(logits: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Compute ``log(1 + Σ_{mask} exp(logits))`` along ``dim`` without overflow.

    Slices along ``dim`` with no masked-in entry give ``log(1 + 0) = 0`` and pass no gradient; their entries
    are kept out of the -inf fill so that the logsumexp backward never evaluates ``exp(-inf - -inf)``.

    Args:
        logits: (..., N, ...) float tensor.
        mask: bool tensor of the same shape; True marks the entries to sum over.
        dim: the dimension reduced.
    """
    has_any = mask.any(dim=dim)
    keep = mask | ~has_any.unsqueeze(dim)
    log_sum = torch.logsumexp(logits.masked_fill(~keep, -math.inf), dim=dim)
    return torch.where(has_any, F.softplus(log_sum), torch.zeros_like(log_sum))


# ---------------------------------------------------------------------------------------------------------


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
        embedding_size: embedding width D.
        margin: δ (official default 0.1, ``--mrg``).
        alpha: α, the scale (official default 32, ``--alpha``).
    """

    lr_multiplier: float = 100.0  # PA:code/train.py puts the proxies at lr × 100

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.1, alpha: float = 32.0) -> None:
        super().__init__()
        check_class_count(num_classes, embedding_size)
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.margin = check_real("proxy_anchor margin", margin, 0.0, 1.0, closed=True)
        self.alpha = check_real("proxy_anchor alpha", alpha, 0.0)
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal with mode fan_out: for a (C, D) tensor fan_out = C, so entries ~ N(0, 2/C)."""
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"margin={self.margin}, alpha={self.alpha}"
        )

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss of a batch.

        Args:
            embeddings: (N, D) raw (unnormalised) embeddings; gradients flow into them and the proxies.
            labels: (N,) integer class indices in ``0..C-1``.
        """
        check_batch(embeddings, labels, self.num_classes, self.embedding_size)
        dtype = compute_dtype(embeddings, self.proxies)
        with full_precision(embeddings.device):
            cosine = l2_normalize(embeddings.to(dtype)) @ l2_normalize(self.proxies.to(dtype)).T  # (N, C)
            positive = F.one_hot(labels.long(), self.num_classes).bool()  # (N, C)
            pos_terms = masked_softplus_logsumexp(-self.alpha * (cosine - self.margin), positive, dim=0)
            neg_terms = masked_softplus_logsumexp(self.alpha * (cosine + self.margin), ~positive, dim=0)
            num_with_positives = positive.any(dim=0).sum()  # >= 1 for a non-empty batch
            return pos_terms.sum() / num_with_positives + neg_terms.sum() / self.num_classes
