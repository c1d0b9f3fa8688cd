"""The one training loop of both stages.

A stage (teacher training, embedding transfer) hands ``fit`` a ``Stage``: the single trainable module
(embedding network + every trainable part of the loss) whose ``forward(batch)`` returns named loss terms,
its parameter groups, the data, and the evaluation protocol. ``fit`` owns everything else: Accelerate
(device, mixed precision), optimiser and schedule, warm-up and BN-freeze, gradient clipping, evaluation every
``eval_every`` epochs with ``last/`` and ``best/`` checkpoints, ``metrics.jsonl``, resumable state and a clean
stop on SIGINT/SIGTERM.

Parts: ``stage`` (what a stage provides, what ``fit`` returns), ``step`` (one optimiser step, the stop and
non-finite decisions), ``bookkeeping`` (``metrics.jsonl``, ``last/`` and ``best/``); this module is the loop.

Under a launcher (``torchrun``, ``accelerate launch``) the module is wrapped in DDP and the stage's loader
yields each process's slice of the global batch; the stage's module gathers what its loss compares
(``dmlkd.engine.distributed``). Evaluation is shared by the processes; files are written by the main
process only, while the others wait. Stop and non-finite-loss decisions are agreed by all processes.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from dmlkd.config.sections import OptimConfig, TrainConfig
from dmlkd.devices import resolve_device
from dmlkd.engine import distributed as dist_utils
from dmlkd.engine import tracking
from dmlkd.engine.bookkeeping import FitBookkeeping, evaluate_and_save, fit_result
from dmlkd.engine.memory_format import use_channels_last
from dmlkd.engine.optim import build_optimizer, build_scheduler, configure_epoch, current_lrs
from dmlkd.engine.stage import FitResult, Stage
from dmlkd.engine.state import Progress, enable_determinism, has_state, load_state, save_state
from dmlkd.engine.step import SKIPPED, StopFlag, to_device, train_step
from dmlkd.engine.tracking import Watcher
from dmlkd.errors import ConfigError, Interrupted

log = logging.getLogger(__name__)


def make_accelerator(config: TrainConfig, find_unused_parameters: bool = False, **tracking: Any) -> Any:
    """The run's ``Accelerator``; under a launcher it joins (or starts) the process group.

    ``find_unused_parameters`` is needed when some parameters get no gradient in a step (warm-up, BN-freeze);
    ``tracking`` holds ``log_with``/``project_dir`` for experiment trackers (``tracking.tracker_kwargs``).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    device = resolve_device(config.device)
    if config.deterministic:
        enable_determinism(device)
    if config.mixed_precision == "fp16" and device.type == "cpu":
        raise ConfigError("mixed precision fp16 needs a GPU; on the CPU use --mixed-precision bf16 or no")
    dist_utils.init_processes(config.device)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    return Accelerator(
        cpu=device.type == "cpu", mixed_precision=config.mixed_precision, kwargs_handlers=[ddp], **tracking
    )


def fit(
    stage: Stage,
    optim: OptimConfig,
    train: TrainConfig,
    run_dir: Path,
    resume: bool = False,
    on_saved: Callable[[], None] | None = None,
) -> FitResult:
    """Train ``stage.module``; see the module docstring for what is written to ``run_dir``.

    The end of a run is published in a fixed order: the final evaluation (one ``metrics.jsonl`` row),
    ``last/``, ``best/`` (when the final step is the best), then the state marked finished. A run killed
    anywhere in that sequence and resumed completes it: nothing is evaluated or recorded twice, and
    ``last/`` and ``best/`` end as those of an uninterrupted run. ``on_saved`` is called (main process)
    after every checkpoint or state write.
    """
    accelerator = make_accelerator(
        train, optim.warmup_epochs > 0 or optim.bn_freeze, **tracking.tracker_kwargs(train, run_dir)
    )
    device = accelerator.device
    if getattr(train, "sync_bn", False):  # TrainConfig.sync_bn: BN statistics over the global batch
        dist_utils.convert_sync_batchnorm(stage.module, device)
    use_channels_last(stage.module, train.mixed_precision, device)
    optimizer = build_optimizer(stage.param_groups, optim, device)
    scheduler = build_scheduler(optimizer, optim, train.epochs)
    progress = Progress()
    state_dir = run_dir / "state"
    if resume and has_state(state_dir):
        progress, _ = load_state(state_dir, stage.module, optimizer, scheduler)
    module, optimizer = accelerator.prepare(stage.module, optimizer)
    if isinstance(module, nn.parallel.DistributedDataParallel):
        # Buffers were synced when DDP wrapped the module; no re-broadcast before every forward: the gathered
        # losses keep loss buffers (CRD memory) identical, and BN statistics are synced before evaluation.
        module.broadcast_buffers = False
    run = FitBookkeeping(stage, run_dir)
    if on_saved is not None:
        run.on_saved = on_saved
    total_steps = stage.batches_per_epoch * train.epochs
    if train.max_steps is not None:
        total_steps = min(total_steps, train.max_steps)
    started = time.perf_counter()
    last_metrics: dict[str, float] = {}
    run.watcher = watcher = _watcher(stage, train, run_dir, total_steps, progress.global_step, accelerator)

    if train.eval_at_start and progress.global_step == 0 and not run.history:
        run.evaluate(device, 0, 0, train.progress)

    def save_progress() -> None:
        if dist_utils.is_main():
            save_state(state_dir, accelerator.unwrap_model(module), optimizer, scheduler, progress)
            run.on_saved()
        dist_utils.barrier()

    with StopFlag() as stop, watcher:
        while progress.global_step < total_steps and not progress.finished:
            epoch = progress.epoch
            module.train()
            configure_epoch(stage.model, stage.head, optim, epoch)
            epoch_end = min(stage.batches_per_epoch, total_steps - epoch * stage.batches_per_epoch)
            for batch, replay_k in stage.loader_factory(epoch, progress.batch_in_epoch):
                step_started = time.perf_counter()
                batch, replay_k = to_device(batch, device), replay_k.to(device)
                terms, stopping = train_step(
                    accelerator, module, optimizer, optim, train, batch, replay_k, progress.global_step, stop
                )
                if SKIPPED in terms:
                    progress.skipped_steps += 1
                    log.warning(
                        "skipped step %d: non-finite loss; %d step(s) skipped in this run so far",
                        progress.global_step,
                        progress.skipped_steps,
                    )
                progress.global_step += 1
                progress.batch_in_epoch += 1
                images = len(batch.images) * dist_utils.world_size()  # global
                watcher.step(
                    progress.global_step,
                    epoch,
                    terms,
                    current_lrs(optimizer),
                    images,
                    time.perf_counter() - step_started,
                )
                if stopping:
                    save_progress()
                    raise Interrupted(stop.signum or signal.SIGTERM, progress.global_step, str(run_dir))
                if train.save_every and progress.global_step % train.save_every == 0:
                    save_progress()
                if progress.batch_in_epoch >= epoch_end:
                    break
            epoch_done = progress.batch_in_epoch >= stage.batches_per_epoch
            run_done = progress.global_step >= total_steps
            if epoch_done:
                scheduler.step()
                progress.epoch += 1
                progress.batch_in_epoch = 0
            if run_done:
                break  # the end of the run is published below, also when a resumed run starts there
            if epoch_done and progress.epoch % train.eval_every == 0:
                last_metrics = evaluate_and_save(run, progress, device, train, stage.primary_metric)
            save_progress()
        # The publish sequence: final evaluation, last/, best/, then the state marked finished. Every part is
        # skipped when already done, so a run killed inside it and resumed completes it exactly once.
        last_metrics = evaluate_and_save(run, progress, device, train, stage.primary_metric)
        if not progress.finished:
            progress.finished = True
            save_progress()
    return fit_result(run, progress, last_metrics, time.perf_counter() - started)


def _watcher(
    stage: Stage, train: TrainConfig, run_dir: Path, total_steps: int, initial_step: int, accelerator: Any
) -> Watcher:
    return Watcher(
        label=tracking.stage_label(stage.record),
        run_dir=run_dir,
        train=train,
        total_steps=total_steps,
        initial_step=initial_step,
        main=dist_utils.is_main(),
        accelerator=accelerator,
        hparams=stage.record.get("train_config"),
    )
