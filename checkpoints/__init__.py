"""Checkpoint folders (safetensors + JSON), strict loading, the Hugging Face Hub, the model zoo, conversion.

The names below are loaded on first use so that importing the command line (``dmlkd --help``)
does not import torch or huggingface_hub.
"""

from __future__ import annotations

from typing import Any

from dmlkd.lazy import lazy_name

_HOMES = {
    "load_checkpoint": "dmlkd.checkpoints.io",
    "load_model": "dmlkd.checkpoints.io",
    "load_state_strict": "dmlkd.checkpoints.folder",
    "read_checkpoint_config": "dmlkd.checkpoints.folder",
    "read_tensors": "dmlkd.checkpoints.folder",
    "resolve_checkpoint_dir": "dmlkd.checkpoints.io",
    "save_checkpoint": "dmlkd.checkpoints.folder",
    "write_folder_atomically": "dmlkd.checkpoints.folder",
    "HubRef": "dmlkd.hub_access",
    "download_snapshot": "dmlkd.checkpoints.snapshot",
    "hub_provenance": "dmlkd.checkpoints.snapshot",
    "load_from_hub": "dmlkd.checkpoints.hub",
    "model_card": "dmlkd.checkpoints.card",
    "parse_hub_ref": "dmlkd.hub_access",
    "pull": "dmlkd.checkpoints.hub",
    "push": "dmlkd.checkpoints.hub",
    "ZooEntry": "dmlkd.checkpoints.zoo",
    "find_teacher": "dmlkd.checkpoints.zoo",
    "zoo_entries": "dmlkd.checkpoints.zoo",
    "convert_reference_checkpoint": "dmlkd.checkpoints.convert",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    return lazy_name(__name__, name, _HOMES)  # also dmlkd.checkpoints.<module> without importing it first
