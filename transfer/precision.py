"""Numeric helpers shared by the transfer losses' tensor math: full precision under autocast, shape checks."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TypeVar

import torch

_Function = TypeVar("_Function", bound=Callable[..., torch.Tensor])


def autocast_disabled(device: torch.device) -> contextlib.AbstractContextManager:
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
