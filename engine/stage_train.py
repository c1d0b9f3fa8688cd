"""The frame both stages' training bodies run in: seeded, and how the training ended recorded in ``run.json``.

``train_teacher`` and ``train_transfer`` build their ``Stage`` inside ``stage_training`` and call
``mark_finished`` after ``fit`` returns, so the two stages seed, record failures and record their end alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from dmlkd.engine.distributed import is_main
from dmlkd.engine.run_record import failure_recorded, mark_status
from dmlkd.engine.stage import FitResult


@contextmanager
def stage_training(run_dir: Path, seed: int) -> Iterator[None]:
    """Seed torch, then run the body; a failure or interruption in it is marked in ``run.json`` (main process).

    The main process is asked when the error happens: the process group may start inside the body.
    """
    with failure_recorded(run_dir, is_main):
        torch.manual_seed(seed)
        yield


def mark_finished(run_dir: Path, result: FitResult, **fields: Any) -> None:
    """Record on the main process that the stage trained to its end: its steps, seconds and ``fields``."""
    if is_main():
        mark_status(
            run_dir, "finished", global_step=result.global_step, train_seconds=round(result.seconds, 1), **fields
        )
