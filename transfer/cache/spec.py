"""What determines a teacher cache's content, and the key that names it.

``CacheSpec`` says which views are cached (exact-replay sets or the clean eval view) and how the teacher runs;
``cache_key`` hashes it together with the teacher's digest (weights and model config), the images (identifiers and
*content*, ``dmlkd.transfer.cache.content``) and the library versions.
See ``dmlkd.transfer.cache.teacher_cache`` for the cache itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Literal

import PIL
import torch
from torch import nn

from dmlkd.checkpoints.folder import MODEL_FILE, read_checkpoint_config
from dmlkd.checkpoints.io import resolve_checkpoint_dir
from dmlkd.data.base import ImageCollection
from dmlkd.data.decode import decoder_name
from dmlkd.data.transforms import ReplaySpec
from dmlkd.errors import ConfigError
from dmlkd.transfer.cache.content import images_digest as digest_images
from dmlkd.version import __version__

FORMAT_VERSION = 2  # 2: the key covers image contents and the full teacher digest
_AUTOCAST_DTYPES = ("float16", "bfloat16")


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class CacheSpec:
    """Everything that determines the cache content besides the teacher and the image list.

    ``seed``/``scale``/``ratio``/``flip_p`` matter in ``cached`` mode only, ``eval_resize_ratio`` in ``clean``
    mode only (None means 1.0, as in ``eval_view``); the key ignores the fields a mode does not use.
    ``autocast`` (``float16`` or ``bfloat16``) runs the teacher under ``torch.autocast``; None keeps fp32. The
    trainer sets it to the training precision, so the cached teacher runs exactly as the online one would.
    ``first_set`` numbers the stored sets ``first_set .. first_set + num_sets - 1`` (a refreshed generation of
    views, ``ReplaySpec.refresh_draws``); 0 for an ordinary cache.
    """

    mode: Literal["cached", "clean"]
    num_sets: int
    seed: int
    image_size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    eval_resize_ratio: float | None = 256 / 224
    with_pooled: bool = False
    autocast: str | None = None
    first_set: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(float(value) for value in self.scale))
        object.__setattr__(self, "ratio", tuple(float(value) for value in self.ratio))
        if self.mode not in ("cached", "clean"):
            raise ConfigError(f"unknown teacher cache mode {self.mode!r}; valid: cached, clean")
        if self.num_sets < 1 or (self.mode == "clean" and self.num_sets != 1):
            raise ConfigError(f"invalid num_sets={self.num_sets} for mode {self.mode!r}; need >= 1 (1 for clean)")
        if self.seed < 0 or self.image_size < 1:
            raise ConfigError(f"invalid seed={self.seed} or image_size={self.image_size}; need >= 0 and >= 1")
        if self.first_set < 0 or (self.mode == "clean" and self.first_set != 0):
            raise ConfigError(f"invalid first_set={self.first_set} for mode {self.mode!r}; need >= 0 (0 for clean)")
        scale, ratio = self.scale, self.ratio
        if len(scale) != 2 or len(ratio) != 2 or not (0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]):
            raise ConfigError(f"invalid crop scale={scale} or ratio={ratio}; need 0 < s0 <= s1 <= 1, 0 < r0 <= r1")
        if not 0 <= self.flip_p <= 1 or (self.eval_resize_ratio is not None and self.eval_resize_ratio < 1):
            raise ConfigError(
                f"invalid flip_p={self.flip_p} or eval_resize_ratio={self.eval_resize_ratio}; "
                "need 0 <= flip_p <= 1 and eval_resize_ratio >= 1"
            )
        if self.autocast is not None and self.autocast not in _AUTOCAST_DTYPES:
            raise ConfigError(f"invalid cache autocast {self.autocast!r}; valid: None, {', '.join(_AUTOCAST_DTYPES)}")

    @property
    def replay(self) -> ReplaySpec | None:
        """What the training ``TrainDataset`` must replay (None in clean mode)."""
        return ReplaySpec(self.num_sets, self.seed) if self.mode == "cached" else None

    def for_generation(self, generation: int) -> CacheSpec:
        """The spec of the ``generation``-th refreshed set of views (sets ``generation * K ..``)."""
        return dataclasses.replace(self, first_set=int(generation) * self.num_sets)

    def content(self) -> dict[str, Any]:
        """The JSON-compatible fields that determine the content in this mode (what the key covers)."""
        data: dict[str, Any] = {
            "mode": self.mode,
            "num_sets": int(self.num_sets),
            "image_size": int(self.image_size),
            "with_pooled": bool(self.with_pooled),
            "autocast": self.autocast,
        }
        if self.mode == "cached":
            data.update(seed=int(self.seed), scale=list(self.scale), ratio=list(self.ratio), flip_p=float(self.flip_p))
            if self.first_set:
                data["first_set"] = int(self.first_set)
        else:
            data["eval_resize_ratio"] = float(self.eval_resize_ratio or 1.0)
        return data


def key_parts(
    spec: CacheSpec,
    teacher_digest: str,
    collection: ImageCollection,
    images_digest: str | None = None,
    index_folder: str | Path | None = None,
) -> dict[str, str]:
    """Every input the cached outputs depend on, as strings (the file metadata records them).

    ``images_digest`` (from ``dmlkd.transfer.cache.content.images_digest``) is computed if not given;
    ``index_folder`` holds the file-hash side index that makes recomputing it cheap.
    """

    if not isinstance(collection, ImageCollection):
        raise TypeError(f"the cache key needs the ImageCollection itself (its contents), got {type(collection)}")
    return {
        "format_version": str(FORMAT_VERSION),
        "spec": json.dumps(spec.content(), sort_keys=True),
        "teacher_digest": teacher_digest,
        "images_digest": images_digest or digest_images(collection, index_folder),
        "num_images": str(len(collection)),
        "dmlkd_version": __version__,
        "torch_version": torch.__version__,
        "pillow_version": PIL.__version__,
        "jpeg_decoder": decoder_name(),
    }


def cache_key(
    spec: CacheSpec, teacher_digest: str, collection: ImageCollection, images_digest: str | None = None
) -> str:
    """Hex SHA-256 over the canonical JSON of the key parts (spec content, teacher, image contents, versions)."""
    return sha256_json(key_parts(spec, teacher_digest, collection, images_digest))


def cache_path(folder: str | Path, key: str) -> Path:
    """Where the cache with ``key`` lives in ``folder``."""
    return Path(folder) / f"teacher-{key[:16]}.safetensors"


def teacher_digest(source: str | Path | nn.Module) -> str:
    """A digest of the teacher's weights and model config.

    For a checkpoint (or run) folder: the ``model.safetensors`` SHA-256 recorded in its ``config.json`` plus
    its model config (no tensor is read). For an in-memory model: the bytes, dtypes and shapes of its state
    dict plus its ``config``. The two kinds never coincide for the same weights, so use one consistently.
    """
    if isinstance(source, nn.Module):
        digest = hashlib.sha256()
        for name, tensor in sorted(source.state_dict().items()):
            data = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}|{data.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(data.view(torch.uint8).numpy())
        config = getattr(source, "config", None)
        config = asdict(config) if is_dataclass(config) else None
        return sha256_json({"kind": "state", "weights": digest.hexdigest(), "model": config})

    record = read_checkpoint_config(resolve_checkpoint_dir(source))
    return sha256_json({"kind": "checkpoint", "weights": record["files"][MODEL_FILE], "model": record["model"]})


digest_of = teacher_digest  # build_cache's ``teacher_digest`` argument shadows the function
