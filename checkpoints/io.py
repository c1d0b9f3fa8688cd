"""Finding and loading a checkpoint by reference: a checkpoint or run folder, ``hf://ORG/NAME[@REV]`` or a
published timm model ``timm/NAME[.TAG][@REV][-0]``.

``resolve_checkpoint_dir`` turns a reference into a checkpoint folder (downloading a Hub snapshot, or writing a
timm model once into the dmlkd cache); ``load_checkpoint`` rebuilds the model and loads it strictly. The folder
format itself (writing, digests, strict reads) is ``dmlkd.checkpoints.folder``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

# A run folder stands for ONE of its checkpoints (last/), the same everywhere: see dmlkd.checkpoints.selection.
from dmlkd.checkpoints.folder import (
    CONFIG_FILE,
    MODEL_FILE,
    is_timm_ref,
    load_state_strict,
    read_checkpoint_config,
    read_model_config,
    read_tensors,
    verify_files,
)
from dmlkd.checkpoints.selection import RUN_CHECKPOINT_DEFAULT, RUN_CHECKPOINTS, SELECTION_NOTE
from dmlkd.checkpoints.selection import selection_note as selection_note
from dmlkd.checkpoints.selection import selection_of as selection_of
from dmlkd.checkpoints.snapshot import hub_provenance, resolve_hub_ref
from dmlkd.checkpoints.timm_hub import check_hub_model_ref, hub_model_folder, load_hub_model
from dmlkd.errors import CheckpointError
from dmlkd.models import build_model
from dmlkd.models.inputs import attach_embed_defaults
from dmlkd.models.timm_backbone import timm_version


def check_model_ref(ref: str | Path) -> None:
    """Fail early with one line when ``ref`` is neither a checkpoint/run folder nor a reachable timm model."""
    if is_timm_ref(ref):
        check_hub_model_ref(str(ref))
    else:
        resolve_checkpoint_dir(ref)


def _looks_like_hub_id(ref: str | Path) -> bool:
    """``org/name`` (one slash, Hub-style names, not ./ or /-anchored): probably meant as ``hf://org/name``."""

    return isinstance(ref, str) and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?", ref) is not None


def resolve_checkpoint_dir(ref: str | Path, which: str | None = None) -> Path:
    """A checkpoint folder, a run folder (its ``last/``, or ``which="best"`` for ``best/``), ``hf://ORG/NAME[@REV]``,
    or a published timm model ``timm/NAME[.TAG][@REV][-0]``.

    A Hub reference is downloaded (or read from the Hub cache) and its snapshot folder, named by the
    resolved commit sha, is returned (``dmlkd.checkpoints.hub.hub_provenance`` recovers repo and commit).
    """
    if which is not None and which not in RUN_CHECKPOINTS:
        raise CheckpointError(f"checkpoint selection {which!r} is not valid; choose from: {', '.join(RUN_CHECKPOINTS)}")
    if isinstance(ref, str) and ref.startswith("hf://"):
        return resolve_hub_ref(ref)
    if is_timm_ref(ref):  # a published timm model: written once as a checkpoint folder in the dmlkd cache
        return hub_model_folder(str(ref))
    path = Path(ref)
    child = which or RUN_CHECKPOINT_DEFAULT
    if (path / CONFIG_FILE).is_file() and not (which and (path / child / CONFIG_FILE).is_file()):
        return path
    if (path / child / CONFIG_FILE).is_file():
        return path / child
    others = [name for name in RUN_CHECKPOINTS if name != child and (path / name / CONFIG_FILE).is_file()]
    if others:
        other = others[0]
        raise CheckpointError(
            f"run folder {str(ref)!r} has no {child}/ checkpoint (an unfinished run?); it has {other}/: "
            f"pass {str(Path(ref) / other)!r} to use {SELECTION_NOTE[other]}"
        )
    if not path.exists():
        hint = f"; if you meant a Hugging Face Hub model, use 'hf://{ref}'" if _looks_like_hub_id(ref) else ""
        raise CheckpointError(f"checkpoint {str(ref)!r} does not exist (give a checkpoint or run folder){hint}")
    raise CheckpointError(
        f"{str(ref)!r} holds no checkpoint: expected {CONFIG_FILE} + {MODEL_FILE} in it, or in its last/ or best/"
    )


def load_checkpoint(ref: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from a checkpoint folder and load its weights strictly; returns ``(model, record)``.

    ``ref`` may also name a published timm model, ``timm/NAME[.TAG][@REV][-0]``: it is built with its Hub
    weights (``dmlkd.models.timm_backbone.load_hub_model``).
    """

    if is_timm_ref(ref):
        model, record = load_hub_model(str(ref))
        attach_embed_defaults(model, record)  # embeds at the pretrained config's input size
        return model.to(device).eval(), record
    directory = resolve_checkpoint_dir(ref)
    record = read_checkpoint_config(directory)
    model_config = read_model_config(record, directory)
    verify_files(directory, record, skip=(MODEL_FILE,))  # the other files; read_tensors checks the weights
    # Never fetch ImageNet weights for a model whose weights are about to be replaced.
    model = build_model(_without_pretrained(model_config))
    state = read_tensors(directory, MODEL_FILE, record)
    load_state_strict(model, state, f"checkpoint {str(directory)!r}")
    _restore_timm_record(model, record)

    hub = hub_provenance(directory)
    if hub:  # loaded through hf://: record the repository and the resolved commit
        record.setdefault("provenance", {})["hub"] = hub
    attach_embed_defaults(model, record)  # the image size `model.embed(...)` uses by default
    return model.to(device).eval(), record


def _restore_timm_record(model: nn.Module, record: Mapping[str, Any]) -> None:
    """Keep the weights' origin (Hub repo, commit, digest) of a timm backbone across save/load cycles."""
    backbone = getattr(model, "backbone", None)
    recorded = (record.get("provenance") or {}).get("timm")
    if backbone is None or not hasattr(backbone, "timm_record") or not isinstance(recorded, dict):
        return
    backbone.weights = recorded.get("weights")

    if recorded.get("timm_version") not in (None, timm_version()):
        import logging

        logging.getLogger(__name__).warning(
            "checkpoint was written with timm %s, this is timm %s (the weights loaded strictly)",
            recorded.get("timm_version"),
            timm_version(),
        )


def _without_pretrained(model_config: Any) -> Any:
    import dataclasses

    return dataclasses.replace(model_config, pretrained=False, weights_path=None)


def load_model(ref: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The embedding model of a checkpoint or run folder, in eval mode."""
    return load_checkpoint(ref, device)[0]
