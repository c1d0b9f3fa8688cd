"""Watching a training run: progress bar or plain log lines, a per-step JSONL, experiment trackers.

``fit`` drives one ``Watcher`` per stage:

* **On a terminal** (stdout and stderr are TTYs and ``train.progress``): a tqdm bar labelled with the stage
  (``teacher`` / ``student``) whose description turns to ``evaluating`` while an evaluation runs; each
  evaluation's result is printed above the bar.
* **Otherwise** (``--no-progress``, ``nohup``, a cluster scheduler): timestamped plain lines on stdout every
  ``train.log_every`` steps (and at the last step) plus one when each evaluation starts and ends, so a job's
  log shows it is alive.
* **Always**, in the run folder: ``steps.jsonl``, one row per optimiser step with every loss term, the learning
  rate of each parameter group, images/s and the time (``metrics.jsonl`` keeps one row per evaluation). On
  resume the rows after the resumed step are dropped first, so replayed steps never appear twice.
* **With ``train.report_to``** (``--report-to tensorboard`` ...): Accelerate's trackers get the resolved
  config as hyper-parameters, the step scalars under ``train/`` and the evaluation metrics under ``eval/``;
  local trackers write under ``<run>/trackers``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dmlkd.errors import ConfigError, choices

STEPS_FILE = "steps.jsonl"
TRACKERS_DIR = "trackers"
# Tracker name (Accelerate's LoggerType value) -> the package it needs.
TRACKER_PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}
_EXTRA = {"tensorboard": "tracking"}  # trackers that a dmlkd extra installs


class _StdoutHandler(logging.StreamHandler):
    """Writes to the current ``sys.stdout`` (which test runners and launchers may replace)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def progress_logger() -> logging.Logger:
    """``dmlkd.progress``: timestamped lines on stdout, independent of the root logger's configuration.

    stdout, not stderr: ``nohup dmlkd ... > train.log`` and schedulers capture it, and stderr stays for the
    one-line error of a failed run.
    """
    logger = logging.getLogger("dmlkd.progress")
    if not logger.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def check_trackers(names: Iterable[str]) -> list[str]:
    """Validate tracker names and that their packages are installed; returns the names without repeats."""
    unique = list(dict.fromkeys(names))
    for name in unique:
        if name not in TRACKER_PACKAGES:
            raise ConfigError(f"unknown tracker {name!r} for --report-to; choose from: {choices(TRACKER_PACKAGES)}")
        package = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            extra = _EXTRA.get(name)
            how = (
                f"pip install 'dmlkd[{extra}]' (from a clone: pip install -e '.[{extra}]') or pip install {package}"
                if extra
                else f"pip install {package}"
            )
            raise ConfigError(f"--report-to {name} needs the {package} package, which is not installed; {how}")
    return unique


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim.lr": 1e-4, ...}``: scalars kept, lists and None as strings (what trackers accept)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def stage_label(record: dict[str, Any]) -> str:
    """``teacher`` or ``student``: what the progress bar and the log lines call the stage."""
    stage = (record.get("train_config") or {}).get("stage")
    return "student" if stage == "transfer" else str(stage or "train")


def tracker_kwargs(train: Any, run_dir: Path) -> dict[str, Any]:
    """The ``Accelerator`` arguments that enable ``train.report_to`` (empty when no tracker is asked for)."""
    names = check_trackers(getattr(train, "report_to", None) or [])
    if not names:
        return {}
    return {"log_with": names, "project_dir": str(run_dir / TRACKERS_DIR)}


def _keep_steps_until(path: Path, step: int) -> None:
    """Drop rows after ``step`` (steps that a resumed run will redo); rewrite atomically."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def _number(value: Any) -> float:
    """A loss term (tensor with or without grad, or number) as a float."""
    return float(value.detach()) if hasattr(value, "detach") else float(value)


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Watcher:
    """What ``fit`` reports while it trains; every method is a no-op on non-main processes except trackers."""

    def __init__(
        self,
        *,
        label: str,
        run_dir: Path,
        train: Any,
        total_steps: int,
        initial_step: int,
        main: bool,
        accelerator: Any = None,
        hparams: dict[str, Any] | None = None,
    ) -> None:
        self.label, self.total, self.main = label, total_steps, main
        self.log_every = int(getattr(train, "log_every", 50) or 0)
        self.accelerator = accelerator if getattr(train, "report_to", None) else None
        self.bar = None
        self.log = progress_logger()
        self.started, self.first_step = time.perf_counter(), initial_step
        self.steps_path = run_dir / STEPS_FILE
        if not main:
            return
        _keep_steps_until(self.steps_path, initial_step)
        self.steps_file = open(self.steps_path, "a")
        if train.progress and sys.stdout.isatty() and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total_steps, initial=initial_step, desc=label, unit="step", dynamic_ncols=True, leave=False
            )
        else:
            self.log.info(
                "%s: training %d steps from step %d (run folder %s)", label, total_steps, initial_step, run_dir
            )
        if self.accelerator is not None:
            self.accelerator.init_trackers(run_dir.name or label, config=flat_hparams(hparams or {}))

    def step(self, step: int, epoch: int, terms: dict[str, Any], lrs: dict[str, float], images: int, seconds: float):
        """Record optimiser step ``step`` (1-based): loss terms (tensors or floats), lrs, images in the step."""
        values = {name: _number(value) for name, value in terms.items()}
        throughput = images / max(seconds, 1e-9)
        if self.accelerator is not None:
            scalars = {f"train/{name}": value for name, value in values.items() if math.isfinite(value)}
            scalars.update({f"train/lr/{group}": lr for group, lr in lrs.items()})
            self.accelerator.log({**scalars, "train/images_per_s": throughput}, step=step)
        if not self.main:
            return
        row = {"step": step, "epoch": epoch, **values, "lr": lrs, "images_per_s": round(throughput, 2)}
        row.update({"seconds": round(seconds, 4), "time": round(time.time(), 3)})
        self.steps_file.write(json.dumps(row) + "\n")
        self.steps_file.flush()
        first_lr = next(iter(lrs.values()), float("nan"))
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{first_lr:.2e}", img_s=f"{throughput:.0f}")
            self.bar.update(1)
        elif self.log_every and (step % self.log_every == 0 or step == self.total):
            terms = {k: v for k, v in values.items() if k != "loss"}
            others = ", ".join(f"{k} {v:.4f}" for k, v in terms.items()) if len(terms) > 1 else ""
            elapsed = time.perf_counter() - self.started
            eta = elapsed / max(step - self.first_step, 1) * (self.total - step)
            self.log.info(
                "%s: step %d/%d epoch %d loss %.4f%s lr %.2e %.1f img/s eta %s",
                self.label, step, self.total, epoch, values["loss"], f" ({others})" if others else "",
                first_lr, throughput, _duration(eta),
            )  # fmt: skip

    def eval_started(self, epoch: int, step: int) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.set_description(f"{self.label}: evaluating")
        else:
            self.log.info("%s: evaluating epoch %d (step %d) ...", self.label, epoch, step)

    def eval_finished(self, epoch: int, step: int, metrics: dict[str, float], seconds: float) -> None:
        if self.accelerator is not None:
            numbers = {f"eval/{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float)}
            self.accelerator.log(numbers, step=step)
        if not self.main:
            return
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        line = f"{self.label}: epoch {epoch} (step {step}) {shown} ({seconds:.1f} s)"
        if self.bar is not None:
            self.bar.set_description(self.label)
            self.bar.write(line)
        else:
            self.log.info("%s", line)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the bar and the JSONL, and end the trackers (flushes their files)."""
        if self.accelerator is not None:
            self.accelerator.end_training()
            self.accelerator = None
        if not self.main:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not self.steps_file.closed:
            self.steps_file.close()
