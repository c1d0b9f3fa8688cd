"""Stage 2 outputs: export the compact (student) embedding model and embed images with it.

``export_model(ref, out, format)`` writes an ONNX, ``torch.export`` or safetensors export behind a parity
check (``dmlkd export``); ``embed_images(model, images)`` embeds PIL images, paths or tensors (the same as
``model.embed(images)``; ``dmlkd embed`` writes embeddings of image files to a safetensors file).

The names below are loaded on first use so that importing ``dmlkd.student`` does not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["embed_images", "export_model", "read_embeddings"]

_HOMES = {"embed_images": "embed", "read_embeddings": "embed", "export_model": "export"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"dmlkd.student.{_HOMES[name]}"), name)
    from dmlkd import _submodule

    return _submodule(__name__, name)  # e.g. dmlkd.student.<module> without importing it first
