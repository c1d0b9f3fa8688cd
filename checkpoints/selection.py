"""Which checkpoint a run folder stands for, and how every output names it (torch-free).

A training run keeps ``last/`` (the final step) and ``best/`` (the evaluation with the highest primary metric,
selected on the **test** split as the reference repositories do: optimistic). ``dmlkd.load``, ``dmlkd eval``,
``embed``, ``export``, ``search``, ``hub push`` and the pipeline resolve a run folder to ``last/``; ``RUN/best``
(or ``--which best`` for ``hub push``) selects ``best/`` explicitly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# A run folder stands for ONE of its checkpoints, the same in every command and in ``dmlkd.load``: ``last/``,
# the final step, which involves no selection on the test split. ``RUN/best`` (or ``which="best"``) asks for
# the checkpoint selected on the test split explicitly. Every output names the checkpoint it used with
# ``SELECTION_NOTE`` (``dmlkd eval`` text and --json, embeddings metadata, export.json, search, the report).
RUN_CHECKPOINT_DEFAULT = "last"
RUN_CHECKPOINTS = ("last", "best")
SELECTION_NOTE = {
    "last": "last/ (final step)",
    "best": "best/ (selected on the test split)",
}


def selection_of(directory: str | Path, record: Mapping[str, Any] | None = None) -> str | None:
    """``"last"`` or ``"best"`` for a run's checkpoint folder (from its recorded ``metrics.selected``, else
    its folder name), None for any other checkpoint (a download, an export, a converted file)."""
    if record is None:
        try:
            record = json.loads((Path(directory) / "config.json").read_text())
        except (OSError, ValueError):
            record = {}
    selected = (record.get("metrics") or {}).get("selected") if isinstance(record, Mapping) else None
    if selected in SELECTION_NOTE:
        return str(selected)
    name = Path(directory).name
    return name if name in SELECTION_NOTE and (Path(directory).parent / "run.json").is_file() else None


def selection_note(directory: str | Path, record: Mapping[str, Any] | None = None) -> str:
    """Which checkpoint ``directory`` is and why, e.g. ``last/ (final step)``; ``checkpoint folder`` otherwise."""
    selected = selection_of(directory, record)
    return SELECTION_NOTE[selected] if selected else "checkpoint folder (no run selection)"
