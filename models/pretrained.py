"""Pretrained backbone weights: download or read them, check them strictly, load them.

``pretrained=True`` fetches a URL through ``torch.hub.load_state_dict_from_url`` with hash checking; the file
is cached as ``$TORCH_HOME/hub/checkpoints/<file name>``, so an offline machine works once that file is
there. ``pretrained="<path>"`` reads a local ``.safetensors`` or ``.pth`` file (``weights_only``). Every
failure is a one-line ``CheckpointError`` that says what to do; nothing falls back to random weights.
"""

from __future__ import annotations

import http.client
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from dmlkd.errors import CheckpointError

logger = logging.getLogger(__name__)

BN_INCEPTION_URL = "http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth"

_READ_ERRORS = (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError)
_FETCH_ERRORS = (*_READ_ERRORS, http.client.HTTPException)
_SHOWN_KEYS = 5


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def hub_checkpoint_dir() -> Path:
    """Where ``torch.hub`` caches downloaded weights: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def fetch_state_dict(url: str) -> dict[str, Tensor]:
    """The state dict at ``url``, from the hub cache if present, else downloaded (sha256 prefix checked)."""
    file_name = Path(urlparse(url).path).name
    cached = hub_checkpoint_dir() / file_name
    was_cached = cached.is_file()
    if not was_cached:
        logger.info("downloading pretrained weights %s to %s", url, cached)
    try:
        state = torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except _FETCH_ERRORS as error:
        if was_cached:
            raise CheckpointError(
                f"cannot read cached pretrained weights {cached} ({_one_line(error)}); delete the file to "
                "download it again"
            ) from error
        raise CheckpointError(
            f"pretrained weights {file_name} are not cached and could not be downloaded from {url} "
            f"({_one_line(error)}); put the file at {cached} ($TORCH_HOME/hub/checkpoints/{file_name}) "
            "or pass a local file (pretrained=<path> / model.weights_path)"
        ) from error
    return _as_tensor_dict(state, str(cached))


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a local weight file: ``.safetensors``, or a pickled state dict loaded with ``weights_only``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist; pass an existing .pth or .safetensors file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors raises its own SafetensorError besides the usual I/O errors
        raise CheckpointError(f"cannot read weights file {str(path)!r}: {_one_line(error)}") from error
    return _as_tensor_dict(state, str(path))


def _as_tensor_dict(state: Any, source: str) -> dict[str, Tensor]:
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(value, Tensor) for value in state.values()):
        raise CheckpointError(f"{source} does not hold a state dict (a mapping of names to tensors)")
    return {str(key): value for key, value in state.items()}


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (f" (+{len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else "")


def check_state_dict(expected: Mapping[str, Tensor], given: Mapping[str, Tensor], source: str) -> None:
    """Raise ``CheckpointError`` naming missing, unexpected or mis-shaped keys of ``given``.

    ``num_batches_tracked`` buffers may be absent (files written by old PyTorch versions lack them).
    """
    missing = [key for key in expected if key not in given and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in given if key not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listing(unexpected)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: {'; '.join(problems)}")
    shapes = [
        f"{key} {tuple(given[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if key in given and given[key].shape != value.shape
    ]
    if shapes:
        raise CheckpointError(f"{source} does not fit the model: shape mismatch (file vs model) {_listing(shapes)}")


def load_backbone_state_dict(backbone: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Adapt ``state_dict`` to ``backbone`` (a ``Backbone``: its ``adapt_checkpoint`` drops classifiers,
    squeezes ...), check it strictly, load it. Typed as a module so this file does not import ``backbones``."""
    state = backbone.adapt_checkpoint(state_dict)
    expected = backbone.state_dict()
    check_state_dict(expected, state, source)
    for key, value in expected.items():  # absent num_batches_tracked: keep the module's own counter
        state.setdefault(key, value)
    backbone.load_state_dict(state, strict=True)


def load_pretrained(backbone: nn.Module, pretrained: bool | str, url: str) -> None:
    """Load ImageNet weights into ``backbone``: nothing for ``False``, ``url`` for ``True``, else a file."""
    if pretrained is False:
        return
    if pretrained is True:
        state, source = fetch_state_dict(url), f"pretrained weights {Path(urlparse(url).path).name}"
    else:
        state, source = read_state_dict(pretrained), f"weights file {str(pretrained)!r}"
    load_backbone_state_dict(backbone, state, source)


_REFERENCE_DROPPED = ("fc.", "last_linear.", "aux1.", "aux2.")


def convert_reference_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """Map an original-paper checkpoint (PA / LR, seed-spec §4) to ``EmbeddingNet`` keys.

    Accepts the whole checkpoint (``{"model_state_dict": ...}``) or the inner dict. ``model.embedding.*``
    becomes ``embedding.*``, ``model.<name>`` becomes ``backbone.<name>``, and the unused classifier and
    auxiliary heads (``model.fc.*``, ``model.last_linear.*``, ``model.aux1/2.*``) are dropped. A
    ``module.`` prefix left by ``nn.DataParallel`` is removed.
    """
    if "model_state_dict" in state_dict:
        state_dict = state_dict["model_state_dict"]
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        name = key.removeprefix("module.")
        if not name.startswith("model."):
            raise CheckpointError(
                f"unexpected key {key!r} in reference checkpoint; expected keys of the form model.<name>"
            )
        name = name.removeprefix("model.")
        if name.startswith(_REFERENCE_DROPPED):
            continue
        converted[name if name.startswith("embedding.") else f"backbone.{name}"] = value
    return converted
