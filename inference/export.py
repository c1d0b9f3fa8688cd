"""Export the embedding model (safetensors checkpoint, ONNX, ``torch.export``) behind a parity gate.

Every exported graph takes RGB ``(B, 3, S, S)`` float32 in [0, 1] and returns the embedding ``(B, D)`` only;
the model's own preprocessing (channel order, value range, mean/std) is part of the graph, and with
``normalize`` so is the L2 normalisation. The batch axis is dynamic (ONNX and ``torch.export``).

The export folder is assembled under a temporary name and renamed into place only after the exported
artefact has been loaded back and its outputs compared with the eager model on fixed batches of seeded
random images (several batch sizes): every row must reach cosine >= ``PARITY_THRESHOLD``, else the export
fails with a one-line ``DmlkdError`` and nothing is written. ``export.json`` records the format, the
source checkpoint and its digest, the input/output contract, the parity results and the library versions.

ONNX goes through ``torch.onnx.export(..., dynamo=True)`` (the torch.export-based exporter, the default since
torch 2.9; the TorchScript exporter is deprecated), which needs the ``onnx`` and ``onnxscript`` packages. The
ONNX parity check needs ``onnxruntime``; without it the check is skipped and ``export.json`` says so.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dmlkd.checkpoints.folder import save_checkpoint, write_folder_atomically
from dmlkd.checkpoints.io import load_checkpoint, resolve_checkpoint_dir
from dmlkd.checkpoints.selection import selection_note
from dmlkd.config.convert import to_dict
from dmlkd.errors import ConfigError, DmlkdError, choices
from dmlkd.models.inputs import DEFAULT_IMAGE_SIZE, recorded_image_size, recorded_resize_ratio
from dmlkd.paths import sha256_file
from dmlkd.version import __version__

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("onnx", "safetensors", "torch.export")
ARTEFACTS: dict[str, str] = {
    "onnx": "model.onnx",
    "safetensors": "model.safetensors",
    "torch.export": "model.pt2",
}
EXPORT_FILE = "export.json"
EXPORT_FORMAT = "dmlkd-export"
EXPORT_FORMAT_VERSION = 1
PARITY_THRESHOLD = 0.9999
PARITY_BATCH_SIZES: tuple[int, ...] = (1, 4)
PARITY_SEED = 0
INPUT_NAME = "images"
OUTPUT_NAME = "embedding"

Runner = Callable[[Tensor], Tensor]


class EmbeddingOnly(nn.Module):
    """Wraps an ``EmbeddingNet`` so that ``forward(images (B, 3, S, S)) -> embedding (B, D)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images).embedding


def check_format(export_format: str) -> str:
    """Return ``export_format`` if it is one of ``FORMATS``, else raise a ``ConfigError`` listing them."""
    if export_format not in FORMATS:
        raise ConfigError(f"unknown export format {export_format!r}; choose from: {choices(FORMATS)}")
    return export_format


def _check_onnx_tools() -> None:
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"ONNX export needs the {' and '.join(missing)} package(s); install them with "
            "pip install onnx onnxscript onnxruntime (or the extra: pip install 'dmlkd[export]', from a clone "
            "pip install -e '.[export]')"
        )


def _check_target(out: Path, source: Path, overwrite: bool) -> None:
    resolved, source = out.resolve(), source.resolve()
    if resolved == source or resolved in source.parents:
        raise ConfigError(f"export folder {str(out)!r} would replace the source checkpoint {str(source)!r}")
    if out.exists() and not overwrite:
        raise ConfigError(f"export folder {str(out)!r} already exists; pass --overwrite to replace it")


def parity_inputs(image_size: int, batch_sizes: tuple[int, ...] = PARITY_BATCH_SIZES) -> list[Tensor]:
    """The fixed parity batches: seeded uniform RGB images ``(b, 3, S, S)`` in [0, 1], one per batch size."""
    generator = torch.Generator().manual_seed(PARITY_SEED)
    return [torch.rand(size, 3, image_size, image_size, generator=generator) for size in batch_sizes]


def compare_outputs(eager: list[Tensor], exported: list[Tensor], threshold: float = PARITY_THRESHOLD) -> dict:
    """Row-wise cosine and max abs difference, eager vs exported; a ``DmlkdError`` below ``threshold``.

    Returns:
        ``{"checked", "batch_sizes", "min_cosine", "max_abs_diff", "threshold"}`` (floats, JSON-ready).
    """
    cosines, diffs = [], []
    for reference, candidate in zip(eager, exported):
        candidate = torch.as_tensor(candidate).detach().cpu().to(torch.float64)
        reference = reference.detach().cpu().to(torch.float64)
        if candidate.shape != reference.shape:
            raise DmlkdError(
                f"export parity failed: exported output has shape {tuple(candidate.shape)}, "
                f"the eager model gives {tuple(reference.shape)}"
            )
        cosines.append(torch.nn.functional.cosine_similarity(reference, candidate, dim=1, eps=1e-12))
        diffs.append((reference - candidate).abs().max())
    min_cosine = float(torch.cat(cosines).nan_to_num(-1.0).min())
    max_abs_diff = float(torch.stack(diffs).nan_to_num(float("inf")).max())
    result = {
        "checked": True,
        "batch_sizes": [int(r.shape[0]) for r in eager],
        "min_cosine": min_cosine,
        "max_abs_diff": max_abs_diff,
        "threshold": threshold,
    }
    if not min_cosine >= threshold:
        raise DmlkdError(
            f"export parity failed: min cosine(eager, exported) = {min_cosine:.6f} < {threshold} "
            f"(max abs diff {max_abs_diff:.3g}); nothing was written"
        )
    return result


def _write_safetensors(model: nn.Module, folder: Path, context: dict[str, Any]) -> dict[str, Any]:

    record = context["record"]
    provenance = {**(record.get("provenance") or {}), "export": context["provenance"]}
    staging = save_checkpoint(
        folder / ".checkpoint",
        model,
        train_config=record.get("train_config"),
        metrics=record.get("metrics"),
        provenance=provenance,
    )
    for child in staging.iterdir():
        child.replace(folder / child.name)
    staging.rmdir()
    return {"exporter": "dmlkd.checkpoints.save_checkpoint", "loader": "dmlkd.load"}


def _write_onnx(model: nn.Module, folder: Path, context: dict[str, Any]) -> dict[str, Any]:
    import onnx

    batch = torch.export.Dim("batch")
    try:
        torch.onnx.export(
            EmbeddingOnly(model).eval(),
            (context["example"],),
            str(folder / ARTEFACTS["onnx"]),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={INPUT_NAME: {0: batch}},
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    except Exception as error:
        raise DmlkdError(f"ONNX export failed: {type(error).__name__}: {_first_line(error)}") from error
    proto = onnx.load(str(folder / ARTEFACTS["onnx"]), load_external_data=False)
    opset = next((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), None)
    return {
        "exporter": "torch.onnx.export(dynamo=True)",
        "opset": opset,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "loader": "onnxruntime.InferenceSession",
    }


def _write_torch_export(model: nn.Module, folder: Path, context: dict[str, Any]) -> dict[str, Any]:
    batch = torch.export.Dim("batch")
    try:
        program = torch.export.export(
            EmbeddingOnly(model).eval(), (context["example"],), dynamic_shapes={INPUT_NAME: {0: batch}}
        )
    except Exception as error:
        raise DmlkdError(f"torch.export failed: {type(error).__name__}: {_first_line(error)}") from error
    torch.export.save(program, str(folder / ARTEFACTS["torch.export"]))
    return {"exporter": "torch.export.export", "loader": "torch.export.load(path).module()"}


_WRITERS: dict[str, Callable[[nn.Module, Path, dict[str, Any]], dict[str, Any]]] = {
    "onnx": _write_onnx,
    "safetensors": _write_safetensors,
    "torch.export": _write_torch_export,
}


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else "no message"


def _onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def _exported_runner(export_format: str, folder: Path) -> tuple[Runner | None, str]:
    """Load the written artefact back; returns ``(runner, runtime)`` or ``(None, why parity is skipped)``."""
    path = folder / ARTEFACTS[export_format]
    if export_format == "safetensors":
        loaded, _record = load_checkpoint(folder)
        return (lambda images: loaded(images).embedding), "dmlkd.load"
    if export_format == "torch.export":
        program = torch.export.load(str(path)).module()
        return program, f"torch.export.load (torch {torch.__version__})"
    if not _onnxruntime_available():
        return None, "skipped: onnxruntime is not installed"
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(images: Tensor) -> Tensor:
        return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0])

    return run, f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)"


def _check_parity(
    export_format: str, folder: Path, inputs: list[Tensor], eager: list[Tensor], threshold: float
) -> dict[str, Any]:
    runner, runtime = _exported_runner(export_format, folder)
    if runner is None:
        return {"checked": False, "reason": runtime, "threshold": threshold}
    with torch.no_grad():
        exported = [runner(images) for images in inputs]
    return {**compare_outputs(eager, exported, threshold), "runtime": runtime}


def _versions(export_format: str) -> dict[str, str]:

    versions = {"dmlkd": __version__, "torch": torch.__version__}
    if export_format == "onnx":
        for name in ("onnx", "onnxscript", "onnxruntime"):
            try:
                versions[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                versions[name] = "not installed"
    return versions


def _export_record(
    export_format: str,
    folder: Path,
    model: nn.Module,
    image_size: int,
    normalize: bool,
    source_info: dict[str, Any],
) -> dict[str, Any]:

    artefact = ARTEFACTS[export_format]
    prep = dataclasses.asdict(model.config.resolved_preprocessing())
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "export_format": export_format,
        "artefact": artefact,
        "files": {artefact: sha256_file(folder / artefact)},
        "source": source_info,
        "model": to_dict(model.config),
        "embedding_dim": int(model.embedding_dim),
        "normalize": normalize,
        "versions": _versions(export_format),
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 3, image_size, image_size],
            "dtype": "float32",
            "color_order": "RGB",
            "value_range": [0.0, 1.0],
            "preprocessing_baked_in": True,
            "preprocessing": prep,
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", model.embedding_dim],
            "dtype": "float32",
            "l2_normalized": bool(model.config.l2_norm),
        },
    }


def export_model(
    ref: str | Path,
    out: str | Path,
    export_format: str,
    *,
    normalize: bool = False,
    image_size: int | None = None,
    overwrite: bool = False,
    threshold: float = PARITY_THRESHOLD,
) -> dict[str, Any]:
    """Export the embedding model of a checkpoint or run folder to ``out``; returns the export record.

    Args:
        ref: checkpoint folder, or run folder (its ``last/``; ``RUN/best`` for the one selected on the test split).
        out: the export folder to create; an existing one is refused unless ``overwrite``.
        export_format: ``onnx`` (``model.onnx``), ``safetensors`` (a checkpoint folder that ``dmlkd.load``
            reads) or ``torch.export`` (``model.pt2`` for ``torch.export.load``).
        normalize: bake L2 normalisation of the embedding into the exported model.
        image_size: the input size ``S`` (None: the size recorded with the checkpoint, else 224).
        overwrite: replace an existing ``out`` (only once the new export has passed its parity check).
        threshold: minimum row cosine between eager and exported outputs.
    """

    check_format(export_format)
    if image_size is not None and image_size < 1:
        raise ConfigError(f"image size must be a positive integer, got {image_size}")
    if export_format == "onnx":
        _check_onnx_tools()
    out, source = Path(out), resolve_checkpoint_dir(ref)
    _check_target(out, source, overwrite)
    model, record = load_checkpoint(source, device="cpu")
    recorded = recorded_image_size(record)
    if image_size is not None and recorded is not None and image_size != recorded:
        logger.warning("exporting at %d px, but the model was trained and evaluated at %d px", image_size, recorded)
    size = image_size or recorded or DEFAULT_IMAGE_SIZE
    if normalize:  # the model normalises inside forward, so every format captures it
        model.config = dataclasses.replace(model.config, l2_norm=True)
    inputs = parity_inputs(size)
    with torch.no_grad():
        eager = [model(images).embedding for images in inputs]
    source_info = {
        "ref": str(ref),
        "checkpoint": str(source.resolve()),
        "checkpoint_note": selection_note(source, record),
        "spec": str(model.config.spec),
        "model_digest": record["files"]["model.safetensors"],
    }
    resize_ratio = recorded_resize_ratio(record)
    provenance = {"image_size": size, "resize_ratio": resize_ratio, "normalize": normalize, "source": source_info}
    context = {"record": record, "example": inputs[-1], "provenance": provenance}
    result: dict[str, Any] = {}

    def fill(folder: Path) -> None:
        exporter = _WRITERS[export_format](model, folder, context)
        parity = _check_parity(export_format, folder, inputs, eager, threshold)
        result.update(_export_record(export_format, folder, model, size, normalize, source_info))
        result["input"]["eval_view"] = {  # how to turn an image into the input (the model's recorded view)
            "resize": f"shorter side to round({size} * resize_ratio), bilinear",
            "resize_ratio": resize_ratio if resize_ratio is not None else 256 / 224,
            "crop": f"center {size} x {size}",
        }
        result.update({"parity": parity, "exporter": exporter})
        (folder / EXPORT_FILE).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")

    write_folder_atomically(out, fill)
    return result
