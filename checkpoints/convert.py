"""Convert the teacher checkpoints released with Proxy-Anchor / LabelRelaxation into dmlkd checkpoint folders.

The released files (``{cub,cars,SOP}_{bn_inception,resnet50}_512dim_Proxy_Anchor_ckpt.pth``, seed-spec §1)
are pickled dicts ``{"model_state_dict": {...}}`` with keys ``model.<torchvision or Caffe-port name>``,
``model.embedding.weight/bias`` and the unused classifier ``model.fc.*`` / ``model.last_linear.*``. They are
read with ``torch.load(weights_only=True)`` (no arbitrary code), mapped with ``convert_reference_state_dict``
and loaded strictly into an ``EmbeddingNet`` built like the reference teacher: L2-normalised output, GAP+GMP
pooling and the architecture's default preprocessing (BGR 0-255 for BN-Inception, ImageNet RGB for ResNets).
"""

from __future__ import annotations

import logging
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmlkd.checkpoints.folder import save_checkpoint
from dmlkd.errors import CheckpointError, ConfigError, choices
from dmlkd.models import ModelConfig, build_model, convert_reference_state_dict
from dmlkd.models.pretrained import check_state_dict
from dmlkd.paths import sha256_file
from dmlkd.registry import DATASETS

logger = logging.getLogger(__name__)

SOURCE_NOTE = "converted from Proxy-Anchor/LabelRelaxation reference checkpoint"
REPORTED_BY = "Proxy-Anchor README (paper numbers, not measured by dmlkd)"

# Proxy-Anchor README (seed-spec §8.1), 512-d teachers, in %: CUB/Cars R@1/2/4/8, SOP R@1/10/100/1000.
REPORTED_RECALL: dict[tuple[str, str], dict[str, float]] = {
    ("bn_inception", "cub"): {"recall@1": 69.1, "recall@2": 78.9, "recall@4": 86.1, "recall@8": 91.2},
    ("bn_inception", "cars"): {"recall@1": 86.4, "recall@2": 91.9, "recall@4": 95.0, "recall@8": 97.0},
    ("bn_inception", "sop"): {"recall@1": 79.2, "recall@10": 90.7, "recall@100": 96.2, "recall@1000": 98.6},
    ("resnet50", "cub"): {"recall@1": 69.9, "recall@2": 79.6, "recall@4": 86.6, "recall@8": 91.4},
    ("resnet50", "cars"): {"recall@1": 87.7, "recall@2": 92.7, "recall@4": 95.5, "recall@8": 97.3},
}


@dataclass(frozen=True)
class ConversionResult:
    """The written checkpoint folder and what was dropped from the source file."""

    out: Path
    model: str
    source_sha256: str
    dropped_keys: tuple[str, ...]


def _load_error(path: Path, error: Exception) -> CheckpointError:
    """One line for a file ``torch.load(weights_only=True)`` refused; pickled code is named as such."""
    text = str(error)
    called = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
    if called:
        return CheckpointError(
            f"refusing {str(path)!r}: it is a pickle that would call {called.group(1)}; dmlkd reads .pth files "
            "with weights_only=True and never runs pickled code; the file must hold only tensors (re-save it with "
            "torch.save(model.state_dict(), ...))"
        )
    size = path.stat().st_size
    if isinstance(error, EOFError) or size == 0:
        what = "is empty (0 bytes)" if size == 0 else f"ends early after {size:,} bytes (truncated?)"
        return CheckpointError(f"cannot read {str(path)!r}: the file {what}; download the .pth file again")
    details = [line.strip() for line in text.partition("WeightsUnpickler error:")[2].splitlines() if line.strip()]
    reason = details[0][:160] if details else " ".join(text.split())[:300]
    return CheckpointError(
        f"cannot read {str(path)!r} as a PyTorch weights file (weights_only): {reason or type(error).__name__}; "
        "pass a .pth file written by torch.save"
    )


def read_reference_file(path: Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with one-line errors; a dict of tensors, possibly wrapped."""
    import torch

    if not path.is_file():
        raise CheckpointError(f"reference checkpoint {str(path)!r} does not exist; pass the downloaded .pth file")
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols would add lines to the error
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
        raise _load_error(path, error) from None
    inner = data.get("model_state_dict", data) if isinstance(data, dict) else None
    if not isinstance(inner, dict) or not inner or not all(torch.is_tensor(value) for value in inner.values()):
        raise CheckpointError(
            f"{str(path)!r} is not a reference teacher checkpoint: expected a dict with 'model_state_dict' "
            "mapping model.<name> keys to tensors"
        )
    return data


def reference_model_config(spec: str) -> Any:
    """A reference teacher's ``ModelConfig``: L2-normalised, Kaiming head, GAP+GMP, default preprocessing."""

    return ModelConfig.from_spec(spec, l2_norm=True, head_init="kaiming", pretrained=False)


def reported_metrics(arch: str, dim: int, dataset: str) -> dict[str, Any]:
    """The paper's Recall@K of a released teacher as fractions (what the teacher sanity check compares to).

    Marked ``reported_by`` so nobody mistakes them for numbers measured by dmlkd; empty when not published.
    """
    reported = REPORTED_RECALL.get((arch, dataset)) if dim == 512 else None
    if not reported:
        return {}
    return {**{name: round(value / 100, 4) for name, value in reported.items()}, "reported_by": REPORTED_BY}


def _check_dataset(dataset: str) -> str:

    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; choose from: {choices(DATASETS.names())}")
    return dataset


def _dropped(state: dict[str, Any], kept: dict[str, Any]) -> tuple[str, ...]:
    inner = state.get("model_state_dict", state)
    mapped = {key.removeprefix("module.").removeprefix("model.") for key in inner}
    return tuple(sorted(key for key in mapped if f"backbone.{key}" not in kept and key not in kept))


def convert_reference_checkpoint(
    path: str | Path, spec: str, dataset: str, out: str | Path, *, overwrite: bool = False
) -> ConversionResult:
    """Turn a Proxy-Anchor / LabelRelaxation teacher file into a dmlkd checkpoint folder at ``out``.

    Args:
        path: the released ``.pth`` file.
        spec: the model it holds, ``bn_inception-512`` or ``resnet50-512`` (any ``ARCH-DIM`` is accepted).
        dataset: the dataset it was trained on (a dmlkd dataset name, e.g. ``cub``); recorded only.
        out: the checkpoint folder to create (written atomically).
        overwrite: replace an existing non-empty ``out``.

    Raises:
        CheckpointError: unreadable file, or a model that does not fit it (names missing/unexpected keys).
    """

    path, out = Path(path), Path(out)
    config = reference_model_config(spec)
    dataset = _check_dataset(dataset)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"--out {str(out)!r} already exists; choose a new folder or pass --overwrite")
    raw = read_reference_file(path)
    state = convert_reference_state_dict(raw)
    model = build_model(config)
    source = f"reference checkpoint {path.name!r} as {config.spec}"
    try:
        check_state_dict(model.state_dict(), state, source)
    except CheckpointError as error:
        raise CheckpointError(
            f"{error}; check --model (the released teachers are bn_inception-512 and resnet50-512)"
        ) from None
    for key, value in model.state_dict().items():  # files from old PyTorch lack num_batches_tracked
        state.setdefault(key, value)
    model.load_state_dict(state, strict=True)
    digest = sha256_file(path)
    provenance = {
        "source": SOURCE_NOTE,
        "source_file": path.name,
        "source_sha256": digest,
        "dataset": dataset,
        "loss": "proxy_anchor",
    }
    save_checkpoint(
        out,
        model,
        train_config={"stage": "teacher", "origin": "reference"},
        metrics=reported_metrics(config.arch, config.embedding_dim, dataset),
        provenance=provenance,
    )
    logger.info("converted %s (%s) to %s", path, digest[:12], out)
    return ConversionResult(out, str(config.spec), digest, _dropped(raw, state))
