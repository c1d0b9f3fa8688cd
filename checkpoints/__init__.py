"""Checkpoint folders (safetensors + JSON), strict loading, the Hugging Face Hub, the model zoo, conversion.

The names below are loaded on first use so that importing the command line (``dmlkd --help``)
does not import torch or huggingface_hub.
"""

from __future__ import annotations

from typing import Any

_HOMES = {
    "load_checkpoint": "io",
    "load_model": "io",
    "load_state_strict": "io",
    "read_checkpoint_config": "io",
    "read_tensors": "io",
    "resolve_checkpoint_dir": "io",
    "save_checkpoint": "io",
    "write_folder_atomically": "io",
    "HubRef": "hub",
    "download_snapshot": "hub",
    "hub_provenance": "hub",
    "load_from_hub": "hub",
    "model_card": "hub",
    "parse_hub_ref": "hub",
    "pull": "hub",
    "push": "hub",
    "ZooEntry": "zoo",
    "find_teacher": "zoo",
    "zoo_entries": "zoo",
    "convert_reference_checkpoint": "convert",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"dmlkd.checkpoints.{_HOMES[name]}"), name)
    from dmlkd import _submodule

    return _submodule(__name__, name)  # e.g. dmlkd.checkpoints.<module> without importing it first
