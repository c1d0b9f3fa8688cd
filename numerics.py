"""Numerics shared by the teacher losses and the transfer methods (no stage imports this from the other).

``full_precision`` is the one decorator that runs a tensor function in float32 (float64 when an input is)
with autocast off; ``autocast_disabled`` is the context manager for code that casts its inputs itself.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F

from dmlkd.errors import ConfigError

NORM_EPS = 1e-12  # added to the squared norm before the square root (official Proxy-Anchor l2_norm)

_Function = TypeVar("_Function", bound=Callable[..., torch.Tensor])


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


def check_count(name: str, value: int, low: int = 1) -> int:
    """An integer ``>= low`` (a count the caller computes, e.g. num_classes); a one-line ConfigError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Return the dtype to compute a loss in: float32, or float64 when an input already is float64."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def autocast_disabled(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device`` so matmuls run in the dtype of their (float32/64) inputs."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def full_precision(function: _Function) -> _Function:
    """Run ``function`` with its tensor arguments cast to float32 (float64 if one is) and autocast off."""

    @functools.wraps(function)
    def wrapper(*args: object, **kwargs: object) -> torch.Tensor:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
        args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        with autocast_disabled(tensors[0].device):
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


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


def check_embeddings(name: str, student: torch.Tensor, teacher: torch.Tensor) -> int:
    """Return N after checking that both are (N, D) batches with the same N (the widths may differ)."""
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{name} needs (N, D) student and teacher embeddings with the same N, got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    return student.shape[0]


def zero_with_graph(student: torch.Tensor) -> torch.Tensor:
    """A zero loss that still depends on ``student``, so ``backward()`` works (and gives zero grads)."""
    return student.sum() * 0.0


def eye_mask(n: int, device: torch.device) -> torch.Tensor:
    return torch.eye(n, dtype=torch.bool, device=device)
