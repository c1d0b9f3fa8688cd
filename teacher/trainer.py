"""Stage 1: train a teacher embedding with a classification- or proxy-based DML loss on the shared loop."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmlkd.config import to_dict
from dmlkd.engine.data import build_train_data
from dmlkd.engine.loop import FitResult, Stage, fit
from dmlkd.engine.rundir import mark_status
from dmlkd.errors import ConfigError, choices
from dmlkd.models.outputs import Batch
from dmlkd.registry import TEACHER_LOSSES
from dmlkd.teacher.config import TeacherConfig

log = logging.getLogger(__name__)


class TeacherModule(nn.Module):
    """The embedding network and the loss's class vectors: the one module the optimiser and DDP see."""

    def __init__(self, model: nn.Module, criterion: nn.Module, loss_name: str) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion
        self.loss_name = loss_name

    def forward(self, batch: Batch, replay_k: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        output = self.model(batch.images)
        loss = self.criterion(output.embedding, batch.labels)
        return {"loss": loss, self.loss_name: loss.detach()}


def build_criterion(config: TeacherConfig, num_classes: int) -> nn.Module:
    factory = TEACHER_LOSSES.get(config.loss.name)
    valid = [p for p in inspect.signature(factory).parameters if p not in ("num_classes", "embedding_size")]
    for key in config.loss.kwargs:
        if key not in valid:
            raise ConfigError(
                f"loss {config.loss.name!r} has no option {key!r}; valid options: {choices(valid)}"
            )
    return factory(num_classes, config.model.embedding_dim, **config.loss.kwargs)


def param_groups(module: TeacherModule, config: TeacherConfig) -> list[tuple[str, list[nn.Parameter], float]]:
    model, criterion, optim = module.model, module.criterion, config.optim
    loss_mult = (
        optim.loss_lr_mult if optim.loss_lr_mult is not None else getattr(criterion, "lr_multiplier", 1.0)
    )
    return [
        ("backbone", list(model.backbone.parameters()), optim.backbone_lr_mult),
        ("head", list(model.embedding.parameters()), optim.head_lr_mult),
        ("loss", list(criterion.parameters()), loss_mult),
    ]


@dataclass
class TeacherResult:
    run_dir: Path
    fit: FitResult


def train_teacher(config: TeacherConfig, run_dir: Path, resume: bool = False) -> TeacherResult:
    """Train a teacher as configured; ``run_dir`` must have been prepared by ``prepare_run_dir``."""
    from dmlkd.data.catalog import build_splits
    from dmlkd.models import build_model

    torch.manual_seed(config.train.seed)
    splits, bad = build_splits(config.data)
    for identifier, reason in bad:
        log.warning("skipped bad image %s: %s", identifier, reason)
    data = build_train_data(splits, config.train)
    model = build_model(config.model)
    criterion = build_criterion(config, data.num_classes)
    module = TeacherModule(model, criterion, config.loss.name)
    stage = Stage(
        module=module,
        model=model,
        head=model.embedding,
        param_groups=param_groups(module, config),
        loader_factory=data.loader_factory,
        batches_per_epoch=data.batches_per_epoch,
        splits=splits,
        eval_config=config.eval,
        checkpoint_extras=lambda: {"loss": dict(criterion.state_dict())},
        record={
            "train_config": {"stage": "teacher", **to_dict(config)},
            "provenance": _provenance(config, splits, bad),
        },
    )
    result = fit(stage, config.optim, config.train, run_dir, resume=resume)
    mark_status(run_dir, "finished", global_step=result.global_step, train_seconds=round(result.seconds, 1))
    return TeacherResult(run_dir, result)


def _provenance(config: TeacherConfig, splits: Any, bad: list[tuple[str, str]]) -> dict[str, Any]:
    return {
        "dataset": config.data.name,
        "train_images": len(splits.train),
        "test_images": len(splits.test),
        "skipped_images": [identifier for identifier, _ in bad],
    }
