"""What a training stage hands to ``fit`` (``Stage``) and what ``fit`` returns (``FitResult``).

A stage (teacher training, embedding transfer) provides the single trainable module (embedding network + every
trainable part of the loss) whose ``forward(batch, replay_k)`` returns named loss terms, its parameter groups, the
data and the evaluation protocol; ``dmlkd.engine.loop.fit`` owns everything else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dmlkd.config.sections import EvalConfig
from dmlkd.data.base import DatasetSplits
from dmlkd.engine.optim import ParamGroup

ENTRY_KEYS = ("epoch", "step", "eval_seconds")  # bookkeeping fields of a metrics.jsonl row


@dataclass
class Stage:
    """What a training stage provides to ``fit``."""

    module: nn.Module  # forward(batch, replay_k) -> {"loss": total, "<term>": value, ...}
    model: nn.Module  # the EmbeddingNet inside ``module`` that is evaluated and saved
    head: nn.Module  # the embedding layer (trains during warm-up)
    param_groups: list[ParamGroup]
    loader_factory: Callable[[int, int], Any]  # (epoch, start_batch) -> iterable of batches
    batches_per_epoch: int
    splits: DatasetSplits
    eval_config: EvalConfig
    checkpoint_extras: Callable[[], dict[str, dict[str, torch.Tensor]]] = dict
    record: dict[str, Any] = field(default_factory=dict)  # train_config / provenance stored with checkpoints
    primary_metric: str = "recall@1"


@dataclass
class FitResult:
    last: dict[str, float]
    best: dict[str, float]
    best_epoch: int | None
    global_step: int
    seconds: float
    history: list[dict[str, Any]]
