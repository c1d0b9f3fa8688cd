"""Stage 1: train a teacher embedding with a classification- or proxy-based DML loss on the shared loop."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from dmlkd.checkpoints.folder import load_state_strict, read_checkpoint_config
from dmlkd.checkpoints.io import load_checkpoint, resolve_checkpoint_dir
from dmlkd.config.convert import from_dict, to_dict
from dmlkd.config.resolve import resolve_dataset_defaults
from dmlkd.data.base import DatasetSplits
from dmlkd.data.catalog import build_splits
from dmlkd.data.training import build_train_data
from dmlkd.engine.bookkeeping import recorded_result
from dmlkd.engine.distributed import init_processes, world_size_of_launch
from dmlkd.engine.loop import fit
from dmlkd.engine.stage import FitResult, Stage
from dmlkd.engine.stage_run import run_stage
from dmlkd.engine.stage_train import mark_finished, stage_training
from dmlkd.errors import ConfigError
from dmlkd.evaluation.run import run_input_record
from dmlkd.models import build_model
from dmlkd.registry import TEACHER_LOSSES
from dmlkd.teacher.config import TeacherConfig
from dmlkd.teacher.divide import build_divide
from dmlkd.teacher.module import TeacherModule, build_criterion

log = logging.getLogger(__name__)


def epoch_aware(loader_factory: Any, criterion: nn.Module, epochs: int) -> Any:
    """Tell an epoch-dependent loss (IAA) which epoch starts whenever the loop asks for the epoch's batches."""
    if not hasattr(criterion, "set_epoch"):
        return loader_factory

    def factory(epoch: int, start_batch: int) -> Any:
        criterion.set_epoch(epoch, epochs)
        return loader_factory(epoch, start_batch)

    return factory


def param_groups(module: TeacherModule, config: TeacherConfig) -> list[tuple[str, list[nn.Parameter], float]]:
    model, criterion, optim = module.model, module.criterion, config.optim
    loss_mult = optim.loss_lr_mult if optim.loss_lr_mult is not None else getattr(criterion, "lr_multiplier", 1.0)
    return [
        ("backbone", list(model.backbone.parameters()), optim.backbone_lr_mult),
        ("head", list(model.embedding.parameters()), optim.head_lr_mult),
        ("loss", list(criterion.parameters()), loss_mult),
    ]


@dataclass
class TeacherResult:
    run_dir: Path
    fit: FitResult


@dataclass
class PreparedTeacher:
    """A validated teacher config (dataset defaults resolved) and the dataset it was validated on."""

    config: TeacherConfig
    splits: DatasetSplits
    bad: list[tuple[str, str]]


def prepare_teacher(config: TeacherConfig) -> PreparedTeacher:
    """Every check that needs no training: loss and its options, data layout and counts, the P x K sampler
    for the batch, ``--init`` compatibility. Returns the config with the dataset's defaults filled in."""

    TEACHER_LOSSES.check_options(config.loss.name, config.loss.kwargs)  # name and options, before any data
    if config.init:
        check_init(config)
    splits, bad = build_splits(config.data)
    config = from_dict(TeacherConfig, resolve_dataset_defaults(to_dict(config), splits.defaults))
    data = build_train_data(splits, config.train, world_size=world_size_of_launch())
    build_criterion(config, data.num_classes)
    return PreparedTeacher(config, splits, bad)


def run_teacher(
    config: TeacherConfig,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    given: dict[str, Any] | None = None,
    on_saved: Any = None,
) -> TeacherResult:
    """Stage 1 from a typed config into the run folder ``out``: validate, open the folder, train, publish.

    ``resume`` continues the run in ``out`` (``given``: the options given now, which must not contradict
    the saved ones); ``overwrite`` replaces a run there, keeping it until the new run saved its first state.
    ``on_saved`` is called after every checkpoint or state write (pipelines use it).
    """
    return run_stage(
        config,
        out,
        "teacher",
        prepare=prepare_teacher,
        train=train_teacher,
        finished=lambda run_dir: TeacherResult(run_dir, recorded_result(run_dir)),
        resume=resume,
        overwrite=overwrite,
        given=given,
        on_saved=on_saved,
    )


def train_teacher(
    config: TeacherConfig,
    run_dir: Path,
    resume: bool = False,
    prepared: PreparedTeacher | None = None,
    on_saved: Any = None,
) -> TeacherResult:
    """Train a teacher as configured into a prepared run folder (``run_teacher`` does the whole sequence)."""
    with stage_training(run_dir, config.train.seed):
        stage = _teacher_stage(config, prepared)
        result = fit(stage, config.optim, config.train, run_dir, resume=resume, on_saved=on_saved)
        mark_finished(run_dir, result)
        return TeacherResult(run_dir, result)


def _teacher_stage(config: TeacherConfig, prepared: PreparedTeacher | None) -> Stage:
    """The model, loss and data of a teacher run, as the ``Stage`` the shared loop trains."""
    if prepared is not None:
        splits, bad = prepared.splits, prepared.bad
    else:
        splits, bad = build_splits(config.data)
    for identifier, reason in bad:
        log.warning("skipped bad image %s: %s", identifier, reason)
    processes = init_processes(config.train.device)
    data = build_train_data(splits, config.train, rank=processes.rank, world_size=processes.world_size)
    model = build_model(config.model)
    init_digest = initialise_from(model, config.init) if config.init else None
    if config.divide.nb_clusters > 1:  # divide and conquer: K learners on sub-embeddings
        module, groups, loader_factory = build_divide(
            config, model, splits, data, rank=processes.rank, world_size=processes.world_size
        )
        criterion = module.criterion
    else:
        criterion = build_criterion(config, data.num_classes, model.embedding_dim)  # DIM 0: the pooled width
        module = TeacherModule(model, criterion, config.loss.name, views=config.train.views)
        groups = param_groups(module, config)
        loader_factory = epoch_aware(data.loader_factory, criterion, config.train.epochs)
    return Stage(
        module=module,
        model=model,
        head=model.embedding,
        param_groups=groups,
        loader_factory=loader_factory,
        batches_per_epoch=data.batches_per_epoch,
        splits=splits,
        eval_config=config.eval,
        checkpoint_extras=lambda: {"loss": dict(criterion.state_dict())},
        record={
            "train_config": {"stage": "teacher", **to_dict(config)},
            "provenance": {**_provenance(config, splits, bad), "init": config.init, "init_digest": init_digest},
        },
    )


def check_init(config: TeacherConfig) -> None:
    """``--init`` must name a checkpoint of the same architecture and embedding dimension."""

    record = read_checkpoint_config(resolve_checkpoint_dir(config.init))
    found = record.get("model", {})
    wanted = config.model
    if (found.get("arch"), found.get("embedding_dim")) != (wanted.arch, wanted.embedding_dim):
        spec = f"{found.get('arch')}-{found.get('embedding_dim')}"
        raise ConfigError(
            f"--init {config.init!r} holds a {spec} model, but this run trains "
            f"{wanted.arch}-{wanted.embedding_dim}; pass --model {spec}"
        )


def initialise_from(model: nn.Module, ref: str) -> str:
    """Load the embedding network's weights from a checkpoint (same architecture and dimension, strictly)."""

    source, record = load_checkpoint(ref)
    wanted, found = model.config, source.config
    if (wanted.arch, wanted.embedding_dim) != (found.arch, found.embedding_dim):
        raise ConfigError(
            f"--init {ref!r} holds a {found.arch}-{found.embedding_dim} model, but this run trains "
            f"{wanted.arch}-{wanted.embedding_dim}; pass --model {found.arch}-{found.embedding_dim}"
        )
    load_state_strict(model, source.state_dict(), f"--init {ref!r}")
    return record["files"]["model.safetensors"]


def _provenance(config: TeacherConfig, splits: Any, bad: list[tuple[str, str]]) -> dict[str, Any]:

    return {
        "input": run_input_record(config.train, config.eval, splits),  # what embed/export/eval use by default
        "dataset": config.data.name,
        "train_images": len(splits.train),
        "test_images": len(splits.test),
        "skipped_images": [identifier for identifier, _ in bad],
    }
