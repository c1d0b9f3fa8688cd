"""What stage 1 optimises: the teacher's loss built from its config, and the module holding model and loss.

Shared by plain training (``dmlkd.teacher.trainer``) and divide and conquer (``dmlkd.teacher.divide``).
"""

from __future__ import annotations

import torch
from torch import nn

from dmlkd.config.convert import to_dict
from dmlkd.data.batch import Batch
from dmlkd.engine.distributed import gather_view_major
from dmlkd.registry import TEACHER_LOSSES
from dmlkd.teacher.config import TeacherConfig
from dmlkd.teacher.iaa import IntraClassAugmentation


class TeacherModule(nn.Module):
    """The embedding network and the loss's class vectors: the one module the optimiser and DDP see.

    With several processes the loss sees the gathered global batch (embeddings with gradient, labels), in
    single-process row order (``views`` view-major blocks), so every process computes the single-process
    loss (``dmlkd.engine.distributed``).
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, loss_name: str, views: int = 1) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion
        self.loss_name = loss_name
        self.views = views

    def forward(self, batch: Batch, replay_k: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        output = self.model(batch.images)
        embedding = gather_view_major(output.embedding, self.views, with_grad=True)
        loss = self.criterion(embedding, gather_view_major(batch.labels, self.views))
        return {"loss": loss, self.loss_name: loss.detach()}


def build_criterion(config: TeacherConfig, num_classes: int, embedding_dim: int | None = None) -> nn.Module:
    """The configured loss (IAA-wrapped if enabled) on ``embedding_dim`` dimensions (default: the model's)."""
    size = embedding_dim or config.model.embedding_dim
    criterion = TEACHER_LOSSES.build(config.loss.name, num_classes, size, **config.loss.kwargs)
    if config.iaa.enabled:
        options = {k: v for k, v in to_dict(config.iaa).items() if k != "enabled"}
        criterion = IntraClassAugmentation(criterion, num_classes, size, seed=config.train.seed, **options)
    return criterion
