"""Stage 2: train a student to reproduce a frozen teacher's embedding space, on the shared training loop.

The teacher's side (mode, online model or cache) is ``dmlkd.transfer.teacher_source``; this module builds the
student, the method and the trainable module, and runs the stage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmlkd.checkpoints.folder import read_checkpoint_config
from dmlkd.checkpoints.io import check_model_ref, resolve_checkpoint_dir
from dmlkd.config.convert import from_dict, to_dict
from dmlkd.config.resolve import resolve_dataset_defaults
from dmlkd.data.base import DatasetSplits
from dmlkd.data.batch import Batch
from dmlkd.data.catalog import build_splits
from dmlkd.data.training import build_train_data
from dmlkd.data.transforms import ReplaySpec
from dmlkd.engine.bookkeeping import recorded_result
from dmlkd.engine.distributed import gather_batch, gather_output, init_processes, world_size_of_launch
from dmlkd.engine.loop import fit
from dmlkd.engine.run_record import read_run
from dmlkd.engine.stage import FitResult, Stage
from dmlkd.engine.stage_run import run_stage
from dmlkd.engine.stage_train import mark_finished, stage_training
from dmlkd.errors import ConfigError
from dmlkd.evaluation.run import run_input_record
from dmlkd.models import build_model
from dmlkd.models.spec import ModelConfig
from dmlkd.registry import TRANSFER_METHODS
from dmlkd.transfer.base import ModelInfo, TransferContext
from dmlkd.transfer.cache.storage import check_writable_folder
from dmlkd.transfer.cache.teacher_cache import cache_path, describe_cache
from dmlkd.transfer.config import TransferConfig
from dmlkd.transfer.teacher_source import (
    TeacherSource,
    build_teacher_source,
    load_teacher,
    resolve_mode,
    teacher_cache_folder,
)
from dmlkd.transfer.transfer_set import check_transfer_set_options, read_transfer_set, with_transfer_set

log = logging.getLogger(__name__)


class TransferModule(nn.Module):
    """The student and every trainable part of the transfer method: the one module given to the optimiser.

    With several processes the method sees the gathered global batch in single-process row order: student
    embedding and pooled feature with gradient, the teacher's without, labels and dataset indices (CRD's
    memory is then updated with the gathered rows on every process). Stage maps stay per process (they
    only enter per-sample mean terms); see ``dmlkd.engine.distributed``.
    """

    def __init__(self, student: nn.Module, method: nn.Module, teacher: TeacherSource) -> None:
        super().__init__()
        self.student = student
        self.method = method
        object.__setattr__(self, "teacher", teacher)  # not a submodule: see TeacherSource

    def forward(self, batch: Batch, replay_k: torch.Tensor) -> dict[str, torch.Tensor]:
        views = self.method.num_views
        teacher_output = gather_output(self.teacher(batch, replay_k), views, with_grad=False)
        student_output = self.student(batch.images, with_features=self.method.needs_features)
        student_output = gather_output(student_output, views, with_grad=True)
        terms = self.method(student_output, teacher_output, gather_batch(batch, views))
        total = torch.stack([value.float() for value in terms.values()]).sum()
        return {"loss": total, **{name: value.detach() for name, value in terms.items()}}


def param_groups(module: TransferModule, config: TransferConfig) -> list[tuple[str, list[nn.Parameter], float]]:
    student, optim = module.student, config.optim
    groups = [
        ("backbone", list(student.backbone.parameters()), optim.backbone_lr_mult),
        ("head", list(student.embedding.parameters()), optim.head_lr_mult),
    ]
    for name, params, mult in module.method.parameter_groups():
        groups.append((name, params, optim.loss_lr_mult if optim.loss_lr_mult is not None else mult))
    return groups


def check_transfer_config(config: TransferConfig) -> str:
    """Checks made before the run folder exists (method, teacher mode, teacher folder); returns the mode."""

    mode = resolve_mode(config.teacher.mode, config.method.name)
    if not config.teacher.ref:
        raise ConfigError("no teacher given; pass --teacher RUN_OR_CHECKPOINT_FOLDER")
    check_model_ref(config.teacher.ref)  # a folder, or a published timm model timm/NAME[.TAG][-0]
    if config.transfer_set:
        check_transfer_set_options(config.method.name, config.train.ipc)
        read_transfer_set(config.transfer_set)
    return mode


def _training_splits(config: TransferConfig) -> tuple[DatasetSplits, list[tuple[str, str]]]:
    """The dataset's splits, with the train split replaced by the transfer set if one is given."""

    splits, bad = build_splits(config.data)
    if config.transfer_set:
        check_transfer_set_options(config.method.name, config.train.ipc)
        splits = with_transfer_set(splits, config.transfer_set)
        log.info("transfer set %s: %d images (no labels)", config.transfer_set, len(splits.train))
    return splits, bad


@dataclass
class TransferResult:
    run_dir: Path
    fit: FitResult
    teacher_mode: str


def build_method(
    config: TransferConfig, student: Any, teacher: Any, splits: DatasetSplits, num_classes: int
) -> nn.Module:
    """The configured method for ``student`` and ``teacher`` (models, or their ``ModelInfo``)."""

    context = TransferContext(
        student=student if isinstance(student, ModelInfo) else ModelInfo.from_model(student),
        teacher=teacher if isinstance(teacher, ModelInfo) else ModelInfo.from_model(teacher),
        num_classes=num_classes,
        num_train=len(splits.train),
        num_views=config.train.views,
    )
    method = TRANSFER_METHODS.build(config.method.name, context, **config.method.kwargs)
    method.set_train_labels(torch.as_tensor(splits.train.labels, dtype=torch.long))
    return method


@dataclass
class PreparedTransfer:
    """A validated transfer config (dataset defaults resolved) and the splits it was validated on."""

    config: TransferConfig
    splits: DatasetSplits
    bad: list[tuple[str, str]]


def prepare_transfer(config: TransferConfig) -> PreparedTransfer:
    """Every check that needs no training: method and its options, teacher mode, teacher folder and its fit
    to the method (stage taps), transfer set, data layout and counts, the sampler for the batch, a writable
    cache folder. Returns the config with the dataset's defaults filled in."""

    mode = check_transfer_config(config)
    splits, bad = _training_splits(config)
    config = from_dict(TransferConfig, resolve_dataset_defaults(to_dict(config), splits.defaults))
    data = build_train_data(splits, config.train, world_size=world_size_of_launch())
    record = read_checkpoint_config(resolve_checkpoint_dir(config.teacher.ref))
    teacher_config = from_dict(ModelConfig, {**record.get("model", {}), "pretrained": False})
    student_config = from_dict(ModelConfig, {**to_dict(config.student), "pretrained": False})

    with torch.device("meta"):  # shapes only: no weights are allocated or downloaded
        student_info = ModelInfo.from_model(build_model(student_config))
        teacher_info = ModelInfo.from_model(build_model(teacher_config))
    build_method(config, student_info, teacher_info, splits, data.num_classes)  # the method's fit and options
    if mode != "online":
        check_writable_folder(teacher_cache_folder(config), create=False)  # creates nothing yet
    return PreparedTransfer(config, splits, bad)


def run_transfer(
    config: TransferConfig,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    given: dict[str, Any] | None = None,
    on_saved: Any = None,
) -> TransferResult:
    """Stage 2 from a typed config into the run folder ``out``: validate, open the folder, train, publish."""

    def finished(run_dir: Path) -> TransferResult:
        mode = (read_run(run_dir) or {}).get("teacher_mode", "")
        return TransferResult(run_dir, recorded_result(run_dir), mode)

    return run_stage(
        config,
        out,
        "transfer",
        prepare=prepare_transfer,
        train=train_transfer,
        finished=finished,
        resume=resume,
        overwrite=overwrite,
        given=given,
        on_saved=on_saved,
    )


def train_transfer(
    config: TransferConfig,
    run_dir: Path,
    resume: bool = False,
    prepared: PreparedTransfer | None = None,
    on_saved: Any = None,
) -> TransferResult:
    """Train a student into a prepared run folder (``run_transfer`` does the whole sequence)."""
    with stage_training(run_dir, config.train.seed):
        stage, mode = _transfer_stage(config, prepared)
        result = fit(stage, config.optim, config.train, run_dir, resume=resume, on_saved=on_saved)
        mark_finished(run_dir, result, teacher_mode=mode)
        return TransferResult(run_dir, result, mode)


def _transfer_stage(config: TransferConfig, prepared: PreparedTransfer | None) -> tuple[Stage, str]:
    """The student, method, teacher and data of a transfer run, as the ``Stage`` the shared loop trains, and
    the teacher mode it trains with."""
    processes = init_processes(config.train.device)
    method_cls = TRANSFER_METHODS.get(config.method.name)
    mode = resolve_mode(config.teacher.mode, config.method.name)
    teacher, teacher_record, digest = load_teacher(config.teacher.ref)
    splits, bad = (prepared.splits, prepared.bad) if prepared is not None else _training_splits(config)
    replay = ReplaySpec(config.teacher.cache_views, config.train.seed) if mode == "cached" else None
    data = build_train_data(splits, config.train, replay=replay, rank=processes.rank, world_size=processes.world_size)
    student = build_model(config.student)
    method = build_method(config, student, teacher, splits, data.num_classes)
    source = build_teacher_source(config, teacher, digest, splits, method_cls, mode, processes.device, data=data)
    module = TransferModule(student, method, source)
    stage = Stage(
        module=module,
        model=student,
        head=student.embedding,
        param_groups=param_groups(module, config),
        loader_factory=data.loader_factory,
        batches_per_epoch=data.batches_per_epoch,
        splits=splits,
        eval_config=config.eval,
        checkpoint_extras=lambda: {"method": state} if (state := _tensor_state(method)) else {},
        record={
            "train_config": {"stage": "transfer", **to_dict(config)},
            "provenance": {
                "teacher": config.teacher.ref,
                "teacher_digest": digest,
                "teacher_mode": mode,
                "teacher_metrics": teacher_record.get("metrics", {}),
                "teacher_hub": teacher_record.get("provenance", {}).get("hub"),
                "teacher_model": teacher_record.get("model", {}),
                "dataset": config.data.name,
                "method": config.method.name,
                "skipped_images": [i for i, _ in bad],
                "transfer_set": config.transfer_set,
                "train_images": len(splits.train),
                "input": _input_record(config, splits),  # what embed/export/eval use by default
            },
        },
    )
    return stage, mode


def _input_record(config: TransferConfig, splits: DatasetSplits) -> dict[str, Any]:

    return run_input_record(config.train, config.eval, splits)


def _tensor_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value for name, value in module.state_dict().items() if torch.is_tensor(value)}


def build_cache_for(config: TransferConfig) -> dict[str, Any]:
    """``dmlkd cache build``: build or verify the cache ``train_transfer`` would use; returns its description."""

    method_cls = TRANSFER_METHODS.get(config.method.name)
    mode = resolve_mode(config.teacher.mode, config.method.name, for_cache=True)
    if mode == "online":
        raise ConfigError(
            f"teacher mode online uses no cache; choose --teacher-mode cached or clean (method {config.method.name!r})"
        )
    teacher, _record, digest = load_teacher(config.teacher.ref)
    splits, _bad = _training_splits(config)
    device = init_processes(config.train.device).device  # under a launcher the processes share the build
    source = build_teacher_source(config, teacher, digest, splits, method_cls, mode, device)
    return describe_cache(cache_path(teacher_cache_folder(config), source.cache.key))
