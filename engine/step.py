"""One optimiser step of the training loop, and the stop and non-finite-loss decisions made around it.

Whether the loss is finite and whether a stop signal (SIGINT/SIGTERM) arrived are decided together by every
process before the backward pass, so the processes skip, fail or stop at the same step.
"""

from __future__ import annotations

import signal
from typing import Any

import torch
from torch import nn

from dmlkd.config.sections import OptimConfig, TrainConfig
from dmlkd.engine import distributed as dist_utils
from dmlkd.errors import DmlkdError

SKIPPED = "skipped"  # key ``train_step`` adds to the loss terms of a step skipped for a non-finite loss


class NonFiniteLossError(DmlkdError):
    """The loss became NaN or infinite."""


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between optimiser steps."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        try:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: no signal handling
            self._previous.clear()
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *_exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (a tensor, or tuples and lists of them) on ``device``."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(item, device) for item in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(item, device) for item in batch)
    return batch


def _nonfinite_error(terms: dict[str, torch.Tensor], step: int) -> NonFiniteLossError:
    values = ", ".join(f"{name}={value.item():.4g}" for name, value in terms.items())
    return NonFiniteLossError(
        f"non-finite loss at step {step}: {values}; checkpoints saved before it are kept "
        "(lower the learning rate, or --set train.on_nonfinite=skip to skip such steps)"
    )


def train_step(
    accelerator: Any,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    optim: OptimConfig,
    train: TrainConfig,
    batch: Any,
    replay_k: torch.Tensor,
    step: int,
    stop: StopFlag,
) -> tuple[dict[str, torch.Tensor], bool]:
    """One optimiser step; returns the loss terms and whether to stop after it (agreed by all processes)."""
    with accelerator.autocast():
        terms = module(batch, replay_k)
    nonfinite, signalled = dist_utils.any_true(
        not torch.isfinite(terms["loss"]).item(), stop.signum is not None, device=accelerator.device
    )
    if nonfinite and train.on_nonfinite == "skip":
        optimizer.zero_grad(set_to_none=True)
        terms = {**terms, SKIPPED: terms["loss"].new_ones(())}  # counted by ``fit``
    elif nonfinite:
        raise _nonfinite_error(terms, step)
    else:
        accelerator.backward(terms["loss"])
        _clip(accelerator, module, optim)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if dist_utils.world_size() == 1:
        return terms, stop.signum is not None  # a signal during the step stops right after it
    return terms, signalled


def _clip(accelerator: Any, module: nn.Module, optim: OptimConfig) -> None:
    params = [p for p in module.parameters() if p.grad is not None]
    if optim.clip_grad_value is not None:
        accelerator.clip_grad_value_(params, optim.clip_grad_value)
    if optim.clip_grad_norm is not None:
        accelerator.clip_grad_norm_(params, optim.clip_grad_norm)
