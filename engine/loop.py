"""The one training loop of both stages.

A stage (teacher training, embedding transfer) hands ``fit`` a ``Stage``: the single trainable module
(embedding network + every trainable part of the loss) whose ``forward(batch)`` returns named loss terms,
its parameter groups, the data, and the evaluation protocol. ``fit`` owns everything else: Accelerate
(device, mixed precision), optimiser and schedule, warm-up and BN-freeze, gradient clipping, evaluation every
``eval_every`` epochs with ``last/`` and ``best/`` checkpoints, ``metrics.jsonl``, resumable state and a clean
stop on SIGINT/SIGTERM.

Under a launcher (``torchrun``, ``accelerate launch``) the module is wrapped in DDP and the stage's loader
yields each process's slice of the global batch; the stage's module gathers what its loss compares
(``dmlkd.engine.distributed``). Evaluation is shared by the processes; files are written by the main
process only, while the others wait. Stop and non-finite-loss decisions are agreed by all processes.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmlkd.checkpoints.folder import save_checkpoint
from dmlkd.config import EvalConfig, OptimConfig, TrainConfig
from dmlkd.data.base import DatasetSplits
from dmlkd.devices import resolve_device
from dmlkd.engine import distributed as dist_utils
from dmlkd.engine import tracking
from dmlkd.engine.memory_format import use_channels_last
from dmlkd.engine.optim import ParamGroup, build_optimizer, build_scheduler, configure_epoch, current_lrs
from dmlkd.engine.state import Progress, enable_determinism, has_state, load_state, save_state
from dmlkd.engine.tracking import Watcher
from dmlkd.errors import ConfigError, DmlkdError, Interrupted
from dmlkd.evaluation.run import evaluate_model

log = logging.getLogger(__name__)


SKIPPED = "skipped"  # key ``_step`` adds to the loss terms of a step skipped for a non-finite loss
_ENTRY_KEYS = ("epoch", "step", "eval_seconds")  # bookkeeping fields of a metrics.jsonl row


class NonFiniteLossError(DmlkdError):
    """The loss became NaN or infinite."""


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


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between optimiser steps."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
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


def _to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_to_device(item, device) for item in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(item, device) for item in batch)
    return batch


def _nonfinite_error(terms: dict[str, torch.Tensor], step: int) -> NonFiniteLossError:
    values = ", ".join(f"{name}={value.item():.4g}" for name, value in terms.items())
    return NonFiniteLossError(
        f"non-finite loss at step {step}: {values}; checkpoints saved before it are kept "
        "(lower the learning rate, or --set train.on_nonfinite=skip to skip such steps)"
    )


class FitBookkeeping:
    """Bookkeeping of one ``fit`` call (files in the run folder, metrics, checkpoints)."""

    def __init__(self, stage: Stage, run_dir: Path) -> None:
        self.stage = stage
        self.run_dir = run_dir
        self.history: list[dict[str, Any]] = []
        self.metrics_path = run_dir / "metrics.jsonl"
        self.on_saved: Callable[[], None] = lambda: None
        self.watcher: Watcher | None = None  # set by ``fit``: evaluation indicator, log lines, trackers
        if self.metrics_path.exists():
            self.history = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def recorded(self, epoch: int, step: int) -> dict[str, float] | None:
        """The metrics already recorded for this evaluation point (a resumed run never evaluates twice)."""
        for entry in self.history:
            if entry.get("epoch") == epoch and entry.get("step") == step:
                return {k: v for k, v in entry.items() if k not in _ENTRY_KEYS}
        return None

    def evaluate(self, device: torch.device, epoch: int, step: int, progress: bool) -> dict[str, float]:
        """Evaluate (all processes; the model and its loss state are first synced from the main one).

        An evaluation point already in ``metrics.jsonl`` (a run killed after evaluating, then resumed) is
        not repeated: the recorded metrics are returned and no row is appended.
        """
        recorded = self.recorded(epoch, step)
        if recorded is not None:
            return recorded
        started = time.perf_counter()
        if self.watcher is not None:
            self.watcher.eval_started(epoch, step)
        distributed = dist_utils.world_size() > 1
        if distributed:
            dist_utils.broadcast_buffers(self.stage.module)
        metrics = evaluate_model(
            self.stage.model,
            self.stage.splits,
            self.stage.eval_config,
            device,
            progress=progress and dist_utils.is_main(),
            distributed=distributed,
        )
        entry = {
            "epoch": epoch,
            "step": step,
            **metrics,
            "eval_seconds": round(time.perf_counter() - started, 2),
        }
        self.history.append(entry)
        if dist_utils.is_main():
            with open(self.metrics_path, "a") as handle:
                handle.write(json.dumps(entry) + "\n")
        if self.watcher is not None:
            self.watcher.eval_finished(epoch, step, metrics, entry["eval_seconds"])
        return metrics

    def save(self, name: str, metrics: dict[str, float], epoch: int, step: int) -> None:
        """Write checkpoint ``name`` from the main process (unless it already holds this step)."""
        if dist_utils.is_main() and not self.holds(name, epoch, step):
            self._write(name, metrics, epoch, step)
            self.on_saved()
        dist_utils.barrier()

    def holds(self, name: str, epoch: int, step: int) -> bool:
        """Whether checkpoint ``name`` was already written at this evaluation point."""
        try:
            record = json.loads((self.run_dir / name / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            return False
        metrics = record.get("metrics", {}) if isinstance(record, dict) else {}
        return metrics.get("epoch") == epoch and metrics.get("step") == step

    def best_before(self, step: int, primary: str) -> float | None:
        """The best primary metric of the evaluations that selected checkpoints before ``step``."""
        scores = [e.get(primary, -math.inf) for e in self.history if 0 < e.get("step", 0) < step]
        return max(scores) if scores else None

    def _write(self, name: str, metrics: dict[str, float], epoch: int, step: int) -> None:
        save_checkpoint(
            self.run_dir / name,
            self.stage.model,
            extra_tensors=self.stage.checkpoint_extras(),
            train_config=self.stage.record.get("train_config"),
            metrics={**metrics, "epoch": epoch, "step": step, "selected": name},
            provenance=self.stage.record.get("provenance"),
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
    optimizer = build_optimizer(stage.param_groups, optim)
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

    with _StopFlag() as stop, watcher:
        while progress.global_step < total_steps and not progress.finished:
            epoch = progress.epoch
            module.train()
            configure_epoch(stage.model, stage.head, optim, epoch)
            epoch_end = min(stage.batches_per_epoch, total_steps - epoch * stage.batches_per_epoch)
            for batch, replay_k in stage.loader_factory(epoch, progress.batch_in_epoch):
                step_started = time.perf_counter()
                batch, replay_k = _to_device(batch, device), replay_k.to(device)
                terms, stopping = _step(
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
                last_metrics = _evaluate_and_save(run, progress, device, train, stage.primary_metric)
            save_progress()
        # The publish sequence: final evaluation, last/, best/, then the state marked finished. Every part is
        # skipped when already done, so a run killed inside it and resumed completes it exactly once.
        last_metrics = _evaluate_and_save(run, progress, device, train, stage.primary_metric)
        if not progress.finished:
            progress.finished = True
            save_progress()
    return _result(run, progress, last_metrics, time.perf_counter() - started)


def _step(
    accelerator: Any,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    optim: OptimConfig,
    train: TrainConfig,
    batch: Any,
    replay_k: torch.Tensor,
    step: int,
    stop: _StopFlag,
) -> tuple[dict[str, torch.Tensor], bool]:
    """One optimiser step; returns the loss terms and whether to stop after it (agreed by all processes).

    Whether the loss is finite and whether a stop signal arrived are decided together by every process
    before the backward pass, so the processes skip, fail or stop at the same step.
    """
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


def _evaluate_and_save(
    run: FitBookkeeping, progress: Progress, device: torch.device, train: TrainConfig, primary: str
) -> dict[str, float]:
    epoch_label = progress.epoch if progress.batch_in_epoch == 0 else progress.epoch + 1
    step = progress.global_step
    metrics = run.evaluate(device, epoch_label, step, train.progress)  # the same everywhere
    run.save("last", metrics, epoch_label, step)
    score = metrics.get(primary, -math.inf)
    # Selected from metrics.jsonl, not from the saved state: a run killed between last/ and best/ and
    # resumed from an older state still publishes best/ for this step.
    earlier = run.best_before(step, primary)
    if earlier is None or score > earlier:
        progress.best_metric = score
        progress.best_epoch = epoch_label
        run.save("best", metrics, epoch_label, step)
    return metrics


def _clip(accelerator: Any, module: nn.Module, optim: OptimConfig) -> None:
    params = [p for p in module.parameters() if p.grad is not None]
    if optim.clip_grad_value is not None:
        accelerator.clip_grad_value_(params, optim.clip_grad_value)
    if optim.clip_grad_norm is not None:
        accelerator.clip_grad_norm_(params, optim.clip_grad_norm)


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


def recorded_result(run_dir: Path, seconds: float = 0.0) -> FitResult:
    """The result of a finished run, read back from ``metrics.jsonl`` and its ``last/`` and ``best/``."""
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]

    def selected(name: str) -> dict[str, Any]:
        try:
            return json.loads((run_dir / name / "config.json").read_text()).get("metrics", {})
        except (OSError, json.JSONDecodeError):
            return {}

    last, best = selected("last"), selected("best")
    strip = (*_ENTRY_KEYS, "selected")
    return FitResult(
        last={k: v for k, v in last.items() if k not in strip},
        best={k: v for k, v in best.items() if k not in strip},
        best_epoch=best.get("epoch"),
        global_step=int(last.get("step", 0)),
        seconds=seconds,
        history=history,
    )


def _result(run: FitBookkeeping, progress: Progress, last: dict[str, float], seconds: float) -> FitResult:
    best_entry = next((h for h in run.history if h["epoch"] == progress.best_epoch and h["epoch"] > 0), None)
    strip = ("epoch", "step", "eval_seconds")
    best = {k: v for k, v in (best_entry or {}).items() if k not in strip}
    return FitResult(
        last=last,
        best=best,
        best_epoch=progress.best_epoch,
        global_step=progress.global_step,
        seconds=seconds,
        history=run.history,
    )
