"""One interface over the models that embed image files: a checkpoint folder or an exported ONNX model.

``load_embedder(ref)`` reads a checkpoint or run folder (``dmlkd.load`` semantics) or an export folder written
by ``dmlkd export`` (``export.json`` + ``model.onnx`` / ``model.pt2`` / ``model.safetensors``). Every
embedder knows the digest of the *source* checkpoint's ``model.safetensors`` (an export records the digest of
the checkpoint it was made from), so embeddings written by one and queries embedded by the other can be
checked to come from the same weights, and the input size the model expects (fixed for ONNX / torch.export).

``read_views`` turns image files into evaluation views and, with ``skip_bad``, leaves unreadable files out
and reports them instead of stopping at the first one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dmlkd.checkpoints.io import load_checkpoint, resolve_checkpoint_dir
from dmlkd.checkpoints.selection import selection_note
from dmlkd.data.transforms import eval_view
from dmlkd.devices import resolve_device
from dmlkd.errors import CheckpointError, DataError
from dmlkd.models.inputs import open_image, recorded_image_size, recorded_resize_ratio

EXPORT_FILE = "export.json"


@dataclass
class Embedder:
    """A model that maps RGB ``(B, 3, S, S)`` float in [0, 1] to ``(B, D)`` embeddings.

    Attributes:
        ref: what the user named (folder path or ``hf://`` reference).
        kind: ``checkpoint``, ``onnx``, ``torch.export`` or ``safetensors-export``.
        model_digest: sha256 of the source checkpoint's ``model.safetensors``.
        image_size: the input size ``S`` the model was trained/exported for (None: not recorded).
        fixed_size: True when the artefact only accepts ``image_size`` (an export).
        spec: the architecture spec, e.g. ``resnet18-128``.
        normalized: True when the model's output is already L2-normalised.
        checkpoint: the resolved folder (a run folder resolves to its ``last/``).
        checkpoint_note: which checkpoint that is and why, e.g. ``last/ (final step)``.
    """

    ref: str
    kind: str
    model_digest: str
    image_size: int | None
    fixed_size: bool
    spec: str
    normalized: bool
    checkpoint: str
    run: Callable[[Tensor], Tensor] = field(repr=False)
    resize_ratio: float | None = None  # the eval resize ratio the model recorded (None: not recorded)
    checkpoint_note: str = ""

    def describe(self) -> dict[str, Any]:
        """JSON-ready identity: ref, kind, spec, model_digest, image_size, checkpoint, checkpoint_note."""
        return {
            "ref": self.ref,
            "kind": self.kind,
            "spec": self.spec,
            "model_digest": self.model_digest,
            "image_size": self.image_size,
            "checkpoint": self.checkpoint,
            "checkpoint_note": self.checkpoint_note,
        }

    def embed_views(self, views: Tensor, batch_size: int = 64, normalize: bool = False) -> Tensor:
        """``(N, D)`` float32 CPU embeddings of ``views`` ``(N, 3, S, S)``, computed in batches without grad."""
        rows = []
        with torch.no_grad():
            for start in range(0, views.shape[0], batch_size):
                rows.append(torch.as_tensor(self.run(views[start : start + batch_size])).float().cpu())
        embeddings = torch.cat(rows) if rows else torch.empty(0, 0)
        return F.normalize(embeddings, dim=1) if normalize and rows else embeddings


def _read_export(folder: Path) -> dict[str, Any] | None:
    path = folder / EXPORT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {str(path)!r}: {error}") from None


def _onnx_runner(path: Path, record: dict[str, Any]) -> Callable[[Tensor], Tensor]:
    try:
        import onnxruntime
    except ImportError:
        raise CheckpointError(
            f"{str(path)!r} is an ONNX model and needs onnxruntime; install it with pip install onnxruntime "
            "(or pip install -e '.[export]' from a clone)"
        ) from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name, output_name = record["input"]["name"], record["output"]["name"]

    def run(images: Tensor) -> Tensor:
        array = images.detach().cpu().to(torch.float32).contiguous().numpy()
        return torch.from_numpy(session.run([output_name], {input_name: array})[0])

    return run


def _from_export(ref: str, folder: Path, record: dict[str, Any], device: str) -> Embedder:
    kind = record.get("export_format")
    artefact = folder / str(record.get("artefact", ""))
    if kind == "safetensors":
        embedder = _from_checkpoint(ref, folder, device)
        embedder.kind = "safetensors-export"
        return embedder
    if not artefact.is_file():
        raise CheckpointError(f"export folder {str(folder)!r} lacks its model file {artefact.name!r}")
    if kind == "onnx":
        run = _onnx_runner(artefact, record)
    elif kind == "torch.export":
        run = torch.export.load(str(artefact)).module()
    else:
        raise CheckpointError(f"export folder {str(folder)!r} has unknown export format {kind!r}")
    source = record.get("source") or {}
    return Embedder(
        ref=ref,
        kind=kind,
        model_digest=str(source.get("model_digest", "")),
        image_size=int(record["input"]["shape"][2]),
        fixed_size=True,
        spec=str(source.get("spec", "")),
        normalized=bool(record.get("normalize") or record.get("output", {}).get("l2_normalized")),
        checkpoint=str(folder.resolve()),
        run=run,
        checkpoint_note=f"export of {source.get('checkpoint_note') or source.get('checkpoint') or 'a checkpoint'}",
    )


def _from_checkpoint(ref: str, folder: Path, device: str) -> Embedder:

    model, record = load_checkpoint(folder, device=resolve_device(device))
    model.eval()
    target = next(iter(model.parameters())).device
    source = ((record.get("provenance") or {}).get("export") or {}).get("source") or {}

    def run(images: Tensor) -> Tensor:
        return model(images.to(target)).embedding

    return Embedder(
        ref=ref,
        kind="checkpoint",
        # A safetensors export is a checkpoint whose provenance names the checkpoint it came from.
        model_digest=str(source.get("model_digest") or record["files"]["model.safetensors"]),
        image_size=recorded_image_size(record),
        fixed_size=False,
        spec=str(model.config.spec),
        normalized=bool(model.config.l2_norm),
        checkpoint=str(folder.resolve()),
        run=run,
        resize_ratio=recorded_resize_ratio(record),
        checkpoint_note=selection_note(folder, record),
    )


def load_embedder(ref: str | os.PathLike, device: str = "auto") -> Embedder:
    """The embedder of a checkpoint/run folder, an ``hf://`` reference or an export folder."""

    path = Path(ref)
    record = _read_export(path) if path.is_dir() else None
    if record is not None:
        return _from_export(str(ref), path, record, device)
    return _from_checkpoint(str(ref), resolve_checkpoint_dir(ref), device)


def embed_files(
    embedder: Embedder,
    paths: Sequence[Path],
    image_size: int,
    resize_ratio: float | None,
    batch_size: int = 64,
    skip_bad: bool = False,
    normalize: bool = False,
) -> tuple[Tensor, list[Path], list[tuple[str, str]]]:
    """Embed image files batch by batch (only one batch of views in memory).

    Returns:
        ``(embeddings (N, D), kept paths, skipped (path, reason))``. Without ``skip_bad`` the first unreadable
        file is a ``DataError`` naming it; with it such files are left out.
    """

    rows, kept, skipped = [], [], []
    for start in range(0, len(paths), batch_size):
        views = []
        for path in paths[start : start + batch_size]:
            try:
                views.append(eval_view(open_image(path), image_size, resize_ratio))
            except DataError as error:
                if not skip_bad:
                    raise
                skipped.append((str(path), str(error)))
                continue
            kept.append(path)
        if views:
            rows.append(embedder.embed_views(torch.stack(views), batch_size))
    if not rows:
        raise DataError(f"none of the {len(paths)} images could be read; first: {skipped[0][1]}")
    embeddings = torch.cat(rows)
    return (F.normalize(embeddings, dim=1) if normalize else embeddings), kept, skipped
