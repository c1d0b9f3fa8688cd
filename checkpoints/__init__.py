"""Checkpoint folders (safetensors + JSON), strict loading, and (later) the model zoo and the Hub."""

from dmlkd.checkpoints.io import (
    load_checkpoint,
    load_model,
    load_state_strict,
    read_checkpoint_config,
    read_tensors,
    resolve_checkpoint_dir,
    save_checkpoint,
    write_folder_atomically,
)

__all__ = [
    "load_checkpoint",
    "load_model",
    "load_state_strict",
    "read_checkpoint_config",
    "read_tensors",
    "resolve_checkpoint_dir",
    "save_checkpoint",
    "write_folder_atomically",
]
