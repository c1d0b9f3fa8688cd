"""dmlkd.models: backbones (registered in ``dmlkd.registry.BACKBONES``) and the embedding network.

Importing this package is cheap and torch-free: ``dmlkd.models.spec`` (model specs and preprocessing, used by
the torch-free config modules) loads on its own, and the torch-backed names below load on first use.
"""

from __future__ import annotations

from typing import Any

from dmlkd.lazy import lazy_name
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
    # Every built-in backbone is registered before a torch-backed name is handed out.
    return lazy_name(__name__, name, _LAZY, first="dmlkd.models.registered")
