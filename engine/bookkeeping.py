"""What one ``fit`` call records in the run folder: ``metrics.jsonl``, the ``last/`` and ``best/`` checkpoints.

An evaluation point already recorded (a run killed after evaluating, then resumed) is not evaluated again, and a
checkpoint already holding a step is not written again, so a resumed run publishes exactly what an uninterrupted
one would. ``recorded_result`` reads a finished run's result back from these files.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dmlkd.checkpoints.folder import save_checkpoint
from dmlkd.config.sections import TrainConfig
from dmlkd.engine import distributed as dist_utils
from dmlkd.engine.stage import ENTRY_KEYS, FitResult, Stage
from dmlkd.engine.state import Progress
from dmlkd.engine.tracking import Watcher
from dmlkd.evaluation.run import evaluate_model


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
                return {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
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


def evaluate_and_save(
    run: FitBookkeeping, progress: Progress, device: torch.device, train: TrainConfig, primary: str
) -> dict[str, float]:
    """Evaluate at the current step, write ``last/`` and, when the step is the best so far, ``best/``."""
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


def recorded_result(run_dir: Path, seconds: float = 0.0) -> FitResult:
    """The result of a finished run, read back from ``metrics.jsonl`` and its ``last/`` and ``best/``."""
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]

    def selected(name: str) -> dict[str, Any]:
        try:
            return json.loads((run_dir / name / "config.json").read_text()).get("metrics", {})
        except (OSError, json.JSONDecodeError):
            return {}

    last, best = selected("last"), selected("best")
    strip = (*ENTRY_KEYS, "selected")
    return FitResult(
        last={k: v for k, v in last.items() if k not in strip},
        best={k: v for k, v in best.items() if k not in strip},
        best_epoch=best.get("epoch"),
        global_step=int(last.get("step", 0)),
        seconds=seconds,
        history=history,
    )


def fit_result(run: FitBookkeeping, progress: Progress, last: dict[str, float], seconds: float) -> FitResult:
    """The result of the ``fit`` call that just ended, from its progress and the metrics it recorded."""
    best_entry = next((h for h in run.history if h["epoch"] == progress.best_epoch and h["epoch"] > 0), None)
    best = {k: v for k, v in (best_entry or {}).items() if k not in ENTRY_KEYS}
    return FitResult(
        last=last,
        best=best,
        best_epoch=progress.best_epoch,
        global_step=progress.global_step,
        seconds=seconds,
        history=run.history,
    )
