"""Using a trained model of either stage: export it, embed image files with it, search with it.

Everything here works for *any* checkpoint, run folder, ``hf://`` reference or export, teacher or student:
``export_model(ref, out, format)`` writes an ONNX, ``torch.export`` or safetensors export behind a parity check
(``dmlkd export``); ``embed_paths`` / ``read_embeddings`` write and read embeddings of image files
(``dmlkd embed``); ``dmlkd.inference.search`` answers nearest-neighbour queries against such a file
(``dmlkd search``). The embedding loop itself (``model.embed``, ``embed_images``) is ``dmlkd.models.inputs``.

The names below are loaded on first use so that importing ``dmlkd.inference`` does not import torch.
"""

from __future__ import annotations

from typing import Any

from dmlkd.lazy import lazy_name

__all__ = ["embed_images", "embed_paths", "export_model", "read_embeddings"]

_HOMES = {
    "embed_images": "dmlkd.models.inputs",
    "embed_paths": "dmlkd.inference.embed",
    "read_embeddings": "dmlkd.inference.embed",
    "export_model": "dmlkd.inference.export",
}


def __getattr__(name: str) -> Any:
    return lazy_name(__name__, name, _HOMES)  # also dmlkd.inference.<module> without importing it first
