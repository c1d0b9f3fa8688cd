"""dmlkd.models: backbones (registered in ``dmlkd.registry.BACKBONES``) and the embedding network.

Importing this package is cheap and torch-free: ``dmlkd.models.spec`` (model specs and preprocessing, used by
the torch-free config modules) loads on its own, and the torch-backed names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from dmlkd.models.spec import ModelConfig, ModelSpec, Preprocessing, parse_spec

_LAZY = {
    "Backbone": "dmlkd.models.backbones",
    "EmbeddingNet": "dmlkd.models.embedding",
    "build_model": "dmlkd.models.embedding",
    "create_model": "dmlkd.models.embedding",
    "ModelOutput": "dmlkd.models.outputs",
    "convert_reference_state_dict": "dmlkd.models.pretrained",
}

__all__ = [
    "Backbone",
    "EmbeddingNet",
    "ModelConfig",
    "ModelOutput",
    "ModelSpec",
    "Preprocessing",
    "build_model",
    "convert_reference_state_dict",
    "create_model",
    "parse_spec",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        importlib.import_module("dmlkd.models.registered")  # every built-in backbone registered first
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dmlkd.models' has no attribute {name!r}")
