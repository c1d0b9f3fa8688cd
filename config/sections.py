"""The config sections shared by several commands; the stage configs (teacher, transfer) build on these.

Each section is a dataclass whose ``__post_init__`` checks the ranges its types cannot express. This module is
torch-free.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from dmlkd.errors import ConfigError


@dataclasses.dataclass
class DataConfig:
    """Which dataset to read and how.

    ``name`` is a registered dataset (``dmlkd datasets`` lists them); ``root`` its folder (or CSV file);
    ``options`` are passed to the reader (e.g. ``{"verify_counts": false}``); ``skip_bad_images`` drops
    unreadable images (listing them) instead of stopping at the first one.
    """

    name: str = "glyphs"
    root: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    skip_bad_images: bool = False
    # Accept the same image twice in a split, or in both train and test (by path; by content for csv/folder).
    allow_duplicates: bool = False


@dataclasses.dataclass
class EvalConfig:
    """Retrieval evaluation settings (``dmlkd eval`` and evaluation during training)."""

    metric: typing.Literal["cosine", "euclidean"] = "cosine"
    ks: list[int] | None = None  # None: the dataset's customary K values
    image_size: int | None = None  # None: the dataset's default (224 for the public datasets)
    batch_size: int = 128
    # Evaluation images are resized to image_size * resize_ratio, then centre-cropped to image_size.
    # None: the dataset's default (256/224 for the public datasets, 1.0 for the glyph demo).
    resize_ratio: float | None = None
    num_workers: int = 0
    backend: typing.Literal["auto", "torch", "faiss"] = "auto"
    nmi: bool = True
    seed: int = 0
    # Also report Recall@K under this metric (from the same embeddings), under keys "<metric>/recall@K".
    second_metric: typing.Literal["cosine", "euclidean"] | None = None

    def __post_init__(self) -> None:
        if self.image_size is not None and self.image_size <= 0:
            raise ConfigError(f"eval.image_size must be a positive integer, got {self.image_size}")
        if self.batch_size <= 0:
            raise ConfigError(f"eval.batch_size must be a positive integer, got {self.batch_size}")
        if self.ks is not None and (not self.ks or any(k <= 0 for k in self.ks)):
            raise ConfigError(f"eval.ks must be a non-empty list of positive integers, got {self.ks}")
        if self.resize_ratio is not None and not 1.0 <= self.resize_ratio <= 4.0:
            raise ConfigError(
                f"eval.resize_ratio must be in [1, 4] (resize, then centre-crop), got {self.resize_ratio}"
            )


@dataclasses.dataclass
class EvalCommandConfig:
    """Everything ``dmlkd eval`` needs."""

    checkpoint: str = ""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    device: str = "auto"


@dataclasses.dataclass
class OptimConfig:
    """Optimiser, schedule and the reference's warm-up / BN-freeze semantics (seed-spec §4, §5)."""

    optimizer: typing.Literal["adamw", "sgd", "adam"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    backbone_lr_mult: float = 1.0
    head_lr_mult: float = 1.0
    loss_lr_mult: float | None = None  # None: the loss's own default (Proxy-Anchor proxies: 100)
    clip_grad_value: float | None = 10.0
    clip_grad_norm: float | None = None
    scheduler: typing.Literal["step", "cosine", "none"] = "step"
    lr_decay_step: int = 10
    lr_decay_gamma: float = 0.5
    warmup_epochs: int = 0
    bn_freeze: bool = False
    # The reference re-enables the BN affine parameters frozen by bn_freeze when warm-up ends (seed-spec §4).
    # False gives the corrected behaviour: frozen BN parameters stay frozen.
    warmup_unfreezes_bn: bool = True

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.momentum must lie in [0, 1), got {self.momentum}")
        for name in ("backbone_lr_mult", "head_lr_mult", "loss_lr_mult", "clip_grad_value", "clip_grad_norm"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"optim.{name} must be >= 0, got {value}")
        if self.lr_decay_step <= 0 or not 0 < self.lr_decay_gamma <= 1:
            raise ConfigError(
                f"optim.lr_decay_step must be > 0 and lr_decay_gamma in (0, 1], "
                f"got {self.lr_decay_step} and {self.lr_decay_gamma}"
            )
        if self.warmup_epochs < 0:
            raise ConfigError(f"optim.warmup_epochs must be >= 0, got {self.warmup_epochs}")


@dataclasses.dataclass
class TrainConfig:
    """Batching, length and run-control settings shared by the teacher and transfer stages.

    The batch is global: ``batch_size`` distinct images per optimiser step (before views), drawn as
    ``batch_size / ipc`` classes x ``ipc`` images when ``ipc`` is set, else uniformly at random.
    """

    epochs: int = 60
    max_steps: int | None = None
    batch_size: int = 180
    ipc: int | None = None
    views: int = 1
    sampler_mode: typing.Literal["reference", "cover"] = "reference"
    image_size: int | None = None  # None: the dataset's default (224 for the public datasets)
    crop_scale: list[float] | None = None  # None: the dataset's default ((0.08, 1.0) = RandomResizedCrop)
    crop_ratio: list[float] | None = None  # aspect-ratio range of the random crop; None: the dataset's (3/4, 4/3)
    # Probability of a horizontal flip; None: the dataset's default (0.5; 0 for the glyph demo, where a mirrored
    # glyph is another letter). Set 0 for text, logos, digits or signatures.
    flip_p: float | None = None
    seed: int = 1
    mixed_precision: typing.Literal["no", "fp16", "bf16"] = "no"
    num_workers: int = 0
    eval_every: int = 1
    save_every: int | None = None  # optimiser steps between resumable states (None: at each epoch end)
    device: str = "auto"
    progress: bool = True
    eval_at_start: bool = False  # also evaluate the untrained network (epoch 0) for comparison
    on_nonfinite: typing.Literal["stop", "skip"] = "stop"  # a NaN/inf loss stops the run, or skips the step
    sync_bn: bool = False  # SyncBatchNorm across processes (GPU/NCCL only)
    # Training views: "reduced" = uint8 views, JPEGs decoded at reduced size where the crop allows it (the
    # default); "baseline" = full decode, float32 views made in the workers (the previous path).
    data_path: typing.Literal["reduced", "baseline"] = "reduced"
    # torch.use_deterministic_algorithms(True) (+ cuDNN/cuBLAS settings on a GPU): slower, reproducible on GPUs
    deterministic: bool = False
    # A finished run deletes its resumable state/ (model, optimiser and RNG: as large as two checkpoints);
    # true keeps it.
    keep_state: bool = False
    # Experiment trackers through Accelerate (tensorboard, wandb, mlflow, ...; see dmlkd.engine.tracking).
    report_to: list[str] = dataclasses.field(default_factory=list)
    log_every: int = 50  # optimiser steps between plain log lines (no terminal or --no-progress); 0: none

    def __post_init__(self) -> None:
        if self.log_every < 0:
            raise ConfigError(f"log-every must be >= 0, got {self.log_every}")
        positive = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "views": self.views,
            "eval_every": self.eval_every,
        }
        optional_positive = {
            "max_steps": self.max_steps,
            "ipc": self.ipc,
            "image_size": self.image_size,
            "save_every": self.save_every,
        }
        for name, value in {**positive, **optional_positive}.items():
            if value is not None and value <= 0:
                raise ConfigError(f"{name.replace('_', '-')} must be a positive integer, got {value}")
        if self.num_workers < 0:
            raise ConfigError(f"num-workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {self.seed}")
        if self.ipc is not None and self.ipc > self.batch_size:
            raise ConfigError(
                f"ipc {self.ipc} is larger than the batch size {self.batch_size}; a batch holds P classes x "
                f"ipc images, so use a batch size that is a multiple of ipc (e.g. {2 * self.ipc})"
            )
        if self.ipc is not None and self.batch_size % self.ipc:
            raise ConfigError(
                f"batch size {self.batch_size} is not a multiple of ipc {self.ipc}; "
                f"a batch holds P classes x ipc images"
            )
        if self.crop_scale is not None and (
            len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1
        ):
            raise ConfigError(f"crop_scale must be [min, max] with 0 < min <= max <= 1, got {self.crop_scale}")
        if self.crop_ratio is not None and (
            len(self.crop_ratio) != 2 or not 0 < self.crop_ratio[0] <= self.crop_ratio[1] <= 10
        ):
            raise ConfigError(f"crop_ratio must be [min, max] with 0 < min <= max <= 10, got {self.crop_ratio}")
        if self.flip_p is not None and not 0.0 <= self.flip_p <= 1.0:
            raise ConfigError(f"flip_p must be a probability in [0, 1], got {self.flip_p}")
