"""Published timm models used as checkpoints: ``timm/NAME[.TAG][@REV][-0]`` built with its Hub weights.

``load_hub_model`` builds the embedding model (no head, or a fresh ``-DIM`` head) from the Hub weights;
``hub_model_folder`` writes it once as a checkpoint folder in the dmlkd cache so every command can treat it like
any other checkpoint. The backbone itself is ``dmlkd.models.timm_backbone``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from torch import nn

from dmlkd.checkpoints.folder import CONFIG_FILE, save_checkpoint
from dmlkd.config.convert import to_dict
from dmlkd.errors import CheckpointError, ModelSpecError
from dmlkd.models.embedding import build_model
from dmlkd.models.spec import ModelConfig, parse_timm_spec
from dmlkd.models.timm_backbone import download_weights, hub_id_of, pretrained_config, resolve_arch, timm_version
from dmlkd.paths import cache_folder
from dmlkd.version import __version__

HUB_REF_HELP = (
    "timm/NAME[.TAG][@REVISION][-0] such as timm/vit_small_patch14_dinov2.lvd142m (the published model, no "
    "embedding head: its pooled feature, L2-normalised, is the embedding)"
)


def parse_hub_model_ref(ref: str) -> Any:
    """The ``ModelConfig`` of a published timm model used as is (a frozen teacher, ``dmlkd.load``).

    ``DIM`` may be left out and must be 0: a head on top of published weights would be untrained.
    """

    spec = parse_timm_spec(ref, default_dim=0)
    if spec.dim != 0:
        raise ModelSpecError(
            f"{ref!r} would put an untrained {spec.dim}-d embedding head on published weights; use "
            f"{spec.arch}{'@' + spec.revision if spec.revision else ''}-0 (the pooled feature), or train a head "
            f"first with dmlkd teacher train --model {ref}"
        )
    return ModelConfig(arch=spec.arch, embedding_dim=0, l2_norm=True, pretrained=True, revision=spec.revision)


def check_hub_model_ref(ref: str) -> None:
    """Fail early (one line) when ``ref`` is malformed, names no timm model, or its weights are not reachable."""
    config = parse_hub_model_ref(ref)
    cfg = pretrained_config(resolve_arch(config.arch, True))
    repo_id = hub_id_of(cfg)
    if repo_id is None:
        raise CheckpointError(f"{config.arch} has no Hugging Face Hub weights in timm {timm_version()}")
    download_weights(repo_id, config.revision)


def load_hub_model(ref: str) -> tuple[nn.Module, dict[str, Any]]:
    """Build a published timm model (``timm/NAME[.TAG][@REV][-0]``) with its Hub weights, and a record.

    The record has the shape of a checkpoint's ``config.json``: ``files["model.safetensors"]`` is a digest of
    the weights file and the built model config (it keys the teacher-output cache), and
    ``provenance["timm"]`` names the model, tag, timm version, repository, revision and resolved commit.
    """

    model = build_model(parse_hub_model_ref(ref))
    timm_record = model.backbone.timm_record()
    model_dict = to_dict(model.config)
    digest = hashlib.sha256(
        repr((timm_record["weights"]["sha256"], sorted(model_dict.items(), key=str))).encode()
    ).hexdigest()
    record = {
        "format": "dmlkd-checkpoint",
        "format_version": 1,
        "dmlkd_version": __version__,
        "model": model_dict,
        "files": {"model.safetensors": digest},
        "train_config": {},
        "metrics": {},
        "provenance": {"timm": timm_record, "source": ref},
    }
    return model.eval(), record


def hub_model_folder(ref: str) -> Path:
    """A dmlkd checkpoint folder holding the published timm model ``ref`` (written once, in the dmlkd cache).

    Lets every command that takes a checkpoint folder (``dmlkd embed``, ``dmlkd export``, ...) take
    ``timm/NAME[.TAG][@REV]`` too: ``<dmlkd cache>/timm-models/<digest>`` is keyed by the weights file and the
    built model config, so another revision or tag gets its own folder.
    """

    model, record = load_hub_model(ref)
    folder = cache_folder() / "timm-models" / record["files"]["model.safetensors"][:20]
    if not (folder / CONFIG_FILE).is_file():
        save_checkpoint(folder, model, provenance=record["provenance"])
    return folder
