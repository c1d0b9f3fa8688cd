"""Teacher-output cache for embedding transfer: the teacher's outputs on replayable views, computed once.

Modes (``CacheSpec.mode``):

- ``cached`` (exact replay): image ``i`` has ``K`` view parameter sets, set ``k`` being
  ``replay_view_params(ReplaySpec(K, seed), i, k, width, height, scale, ratio, flip_p)``, and the teacher's
  output on each ``(i, k)`` view is stored. A ``TrainDataset(..., replay=spec.replay)`` shows the student
  exactly these views, so ``cache.lookup(batch.indices, replay_k)`` equals the online teacher on the same
  batch up to fp16 rounding (the online teacher of seed-spec §1 item 3, minus the teacher forward).
- ``clean``: ``K = 1``, the deterministic eval view. Cheaper, but a *different method*: the teacher no longer
  sees the student's view (seed-spec §1 item 5a), so two views of one image get identical teacher rows.

A cache is one safetensors file ``teacher-<key[:16]>.safetensors`` holding ``embeddings`` ``(N, K, D)`` fp16
and, with ``with_pooled``, ``pooled`` ``(N, K, P)`` fp16. It costs ``N*K*D*2`` bytes of disk and of host
memory while building (rows are filled batch by batch, the file is written once), and the same on the device
while training: SOP train with K=8, D=512 is 59,551 x 8 x 512 x 2 B ≈ 488 MB. The file metadata holds every
part of the key (content spec, teacher digest, identifiers digest, dmlkd/torch/Pillow versions), the key and
a SHA-256 of the tensor bytes; a file whose parts, key, shapes or bytes do not check out is rebuilt (the
differing part is logged), never used. The key does not cover image *contents*: replacing an image file
under the same identifier needs a new cache folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import PIL
import torch
from safetensors import safe_open
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dmlkd.data.base import ImageCollection
from dmlkd.data.transforms import ReplaySpec, apply_view, eval_view, replay_view_params
from dmlkd.engine.distributed import (
    any_true,
    barrier,
    broadcast_object,
    gather_uneven,
    is_main,
    rank,
    shard_batches,
    world_size,
)
from dmlkd.errors import ConfigError, DataError
from dmlkd.models.outputs import ModelOutput
from dmlkd.transfer.cache_file import (
    _READ_ERRORS,
    FORMAT_NAME,
    FORMAT_VERSION,
    _content_digest,
    _differences,
    _read_checked,
    _sha256_json,
    _write_atomically,
)

logger = logging.getLogger(__name__)

_AUTOCAST_DTYPES = ("float16", "bfloat16")


@dataclass(frozen=True)
class CacheSpec:
    """Everything that determines the cache content besides the teacher and the image list.

    ``seed``/``scale``/``ratio``/``flip_p`` matter in ``cached`` mode only, ``eval_resize_ratio`` in ``clean``
    mode only (None means 1.0, as in ``eval_view``); the key ignores the fields a mode does not use.
    ``autocast`` (``float16`` or ``bfloat16``) runs the teacher under ``torch.autocast``; None keeps fp32.
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(float(value) for value in self.scale))
        object.__setattr__(self, "ratio", tuple(float(value) for value in self.ratio))
        if self.mode not in ("cached", "clean"):
            raise ConfigError(f"unknown teacher cache mode {self.mode!r}; valid: cached, clean")
        if self.num_sets < 1 or (self.mode == "clean" and self.num_sets != 1):
            raise ConfigError(f"invalid num_sets={self.num_sets} for mode {self.mode!r}; need >= 1 (1 for clean)")
        if self.seed < 0 or self.image_size < 1:
            raise ConfigError(f"invalid seed={self.seed} or image_size={self.image_size}; need >= 0 and >= 1")
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
        else:
            data["eval_resize_ratio"] = float(self.eval_resize_ratio or 1.0)
        return data


def _key_parts(spec: CacheSpec, teacher_digest: str, identifiers: Sequence[str]) -> dict[str, str]:
    from dmlkd import __version__

    return {
        "format_version": str(FORMAT_VERSION),
        "spec": json.dumps(spec.content(), sort_keys=True),
        "teacher_digest": teacher_digest,
        "identifiers_digest": _sha256_json([str(name) for name in identifiers]),
        "num_images": str(len(identifiers)),
        "dmlkd_version": __version__,
        "torch_version": torch.__version__,
        "pillow_version": PIL.__version__,
    }


def cache_key(spec: CacheSpec, teacher_digest: str, identifiers: Sequence[str]) -> str:
    """Hex SHA-256 over the canonical JSON of the key parts (spec content, teacher, identifiers, versions)."""
    return _sha256_json(_key_parts(spec, teacher_digest, identifiers))


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
        return _sha256_json({"kind": "state", "weights": digest.hexdigest(), "model": config})
    from dmlkd.checkpoints.io import MODEL_FILE, read_checkpoint_config, resolve_checkpoint_dir

    record = read_checkpoint_config(resolve_checkpoint_dir(source))
    return _sha256_json({"kind": "checkpoint", "weights": record["files"][MODEL_FILE], "model": record["model"]})


_digest_of = teacher_digest  # build_cache's ``teacher_digest`` argument shadows the function


def _device_of(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


class TeacherCache:
    """A loaded cache. ``embeddings`` ``(N, K, D)`` fp16; ``pooled`` ``(N, K, P)`` fp16 or None."""

    def __init__(
        self,
        embeddings: Tensor,
        pooled: Tensor | None,
        spec: CacheSpec,
        key: str,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if embeddings.dim() != 3 or embeddings.shape[1] != spec.num_sets:
            raise ValueError(f"cache embeddings must be (N, {spec.num_sets}, D), got {tuple(embeddings.shape)}")
        if pooled is not None and tuple(pooled.shape[:2]) != tuple(embeddings.shape[:2]):
            raise ValueError(f"cache pooled {tuple(pooled.shape)} does not fit embeddings {tuple(embeddings.shape)}")
        self.embeddings, self.pooled, self.spec, self.key = embeddings, pooled, spec, key
        self.metadata = dict(metadata or {})

    @property
    def num_images(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def device(self) -> torch.device:
        return self.embeddings.device

    def to(self, device: torch.device | str) -> TeacherCache:
        """The same cache with its tensors on ``device``."""
        pooled = None if self.pooled is None else self.pooled.to(device)
        return TeacherCache(self.embeddings.to(device), pooled, self.spec, self.key, self.metadata)

    def check_dataset(self, dataset: Any) -> None:
        """Raise ``ConfigError`` unless ``dataset`` (a ``TrainDataset``) replays exactly the cached views."""
        if len(dataset) != self.num_images:
            raise ConfigError(f"the teacher cache holds {self.num_images} images, the dataset {len(dataset)}")
        if self.spec.mode == "clean":
            return
        spec = self.spec
        theirs = (
            dataset.replay,
            dataset.image_size,
            tuple(dataset.scale),
            tuple(dataset.ratio),
            dataset.flip_p,
        )
        ours = (spec.replay, spec.image_size, spec.scale, spec.ratio, spec.flip_p)
        if theirs != ours:
            raise ConfigError(
                f"the training dataset (replay, image_size, scale, ratio, flip_p) = {theirs} does not replay "
                f"the teacher cache's views {ours}; build TrainDataset with the cache spec's values"
            )

    def lookup(
        self, indices: Tensor, replay_k: Tensor | None = None, device: torch.device | str | None = None
    ) -> ModelOutput:
        """The cached teacher outputs of a batch, as if the teacher had run on it (no grad).

        Args:
            indices: ``(M,)`` dataset positions (``Batch.indices``, view-major).
            replay_k: ``(M,)`` replayed set of each view (from ``collate_views``); ignored in clean mode.
            device: where the result goes (default: the cache's device).

        Returns:
            ``ModelOutput`` with float32 ``embedding`` ``(M, D)`` and ``pooled`` ``(M, P)`` (None unless the
            cache was built ``with_pooled``); ``features`` is None.
        """
        indices = torch.as_tensor(indices).long()
        if self.spec.mode == "clean":
            replay_k = torch.zeros_like(indices)
        elif replay_k is None:
            raise ConfigError("an exact-replay teacher cache needs the replay_k of every view (from collate_views)")
        replay_k = torch.as_tensor(replay_k).long()
        if replay_k.shape != indices.shape or indices.dim() != 1:
            raise ValueError(f"indices {tuple(indices.shape)} and replay_k {tuple(replay_k.shape)} must be (M,)")
        if indices.numel() and (int(replay_k.min()) < 0 or int(replay_k.max()) >= self.spec.num_sets):
            raise ConfigError(
                f"replay_k must lie in [0, {self.spec.num_sets}), got [{int(replay_k.min())}, "
                f"{int(replay_k.max())}] (-1: the TrainDataset was built without replay={self.spec.replay})"
            )
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_images):
            raise DataError(f"indices must lie in [0, {self.num_images}) for this teacher cache")
        device = self.device if device is None else torch.device(device)
        rows, ks = indices.to(self.device), replay_k.to(self.device)
        pooled = None if self.pooled is None else self.pooled[rows, ks].to(device).float()
        embedding = self.embeddings[rows, ks].to(device).float()
        return ModelOutput(embedding=embedding, pooled=pooled)  # type: ignore[arg-type]


class CacheViewDataset(Dataset):
    """Item ``i`` -> ``(views (K, 3, S, S), i)``: the ``K`` cached views of image ``i``, loaded once."""

    def __init__(self, collection: ImageCollection, spec: CacheSpec) -> None:
        self.collection, self.spec = collection, spec

    def __len__(self) -> int:
        return len(self.collection)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        spec, image = self.spec, self.collection.load(index)
        if spec.mode == "clean":
            return eval_view(image, spec.image_size, spec.eval_resize_ratio).unsqueeze(0), index
        views = []
        for k in range(spec.num_sets):
            params = replay_view_params(spec.replay, index, k, *image.size, spec.scale, spec.ratio, spec.flip_p)
            views.append(apply_view(image, params, spec.image_size))
        return torch.stack(views), index


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


@torch.no_grad()
def _run_teacher(
    teacher: nn.Module,
    collection: ImageCollection,
    spec: CacheSpec,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    progress: bool,
) -> dict[str, Tensor]:
    """Every cached output, on the CPU in fp16: ``{"embeddings": (N, K, D)[, "pooled": (N, K, P)]}``.

    With several processes each runs the teacher on its share of the single-process batches and the rows
    are gathered, so every process returns the whole (identical) result.
    """
    count, sets = len(collection), spec.num_sets
    loader = DataLoader(
        CacheViewDataset(collection, spec),
        batch_sampler=shard_batches(count, max(1, batch_size // sets), rank(), world_size()),
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    names = ("embeddings", "pooled") if spec.with_pooled else ("embeddings",)
    store: dict[str, Tensor] = {}
    filled = torch.zeros(count, dtype=torch.bool)
    autocast = (
        torch.autocast(device.type, dtype=getattr(torch, spec.autocast)) if spec.autocast else contextlib.nullcontext()
    )
    with (
        _eval_mode(teacher),
        tqdm(total=count, desc="teacher cache", unit="img", disable=not progress) as bar,
    ):
        for views, indices in loader:
            with autocast:
                output = teacher(views.flatten(0, 1).to(device, non_blocking=True))
            for name, value in zip(names, (output.embedding, output.pooled)):
                value = value.reshape(len(indices), sets, -1).to(torch.float16).cpu()
                if name not in store:
                    store[name] = torch.zeros((count, sets, value.shape[-1]), dtype=torch.float16)
                store[name][indices] = value
            filled[indices] = True
            bar.update(len(indices))
    if world_size() > 1:
        store, filled = _gather_shards(store, filled, names, sets)
    if count == 0 or not bool(filled.all()):
        raise DataError(f"the teacher cache covers {int(filled.sum())} of {count} images; nothing to cache")
    return store


def _gather_shards(
    store: dict[str, Tensor], filled: Tensor, names: tuple[str, ...], sets: int
) -> tuple[dict[str, Tensor], Tensor]:
    """Every process's filled rows put together (rows travel flattened: a process may have none)."""
    mine = torch.nonzero(filled).squeeze(1)
    rows = torch.cat(gather_uneven(mine))
    merged: dict[str, Tensor] = {}
    for name in names:
        local = store[name][mine].flatten() if name in store else torch.zeros(0, dtype=torch.float16)
        values = torch.cat(gather_uneven(local.float())).to(torch.float16)  # fp16 -> fp32 -> fp16 is exact
        values = values.reshape(rows.numel(), sets, -1)
        merged[name] = torch.zeros((filled.numel(), sets, values.shape[-1]), dtype=torch.float16)
        merged[name][rows] = values
    everywhere = torch.zeros_like(filled)
    everywhere[rows] = True
    return merged, everywhere


def build_cache(
    teacher: nn.Module,
    collection: ImageCollection,
    spec: CacheSpec,
    path: str | Path,
    *,
    key: str | None = None,
    teacher_digest: str | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> TeacherCache:
    """Run the teacher (eval mode, no grad) on every cached view and write the cache file atomically.

    Args:
        teacher: returns a ``ModelOutput`` for RGB ``[0, 1]`` images; its train/eval flags are restored.
        collection: the training images; row ``i`` of the cache is ``collection`` item ``i``.
        spec: what to cache.
        path: the file to write (``load_or_build_cache`` uses ``cache_path(folder, key)``).
        key: if given, must equal ``cache_key(spec, teacher_digest, collection.identifiers)``.
        teacher_digest: recorded in the metadata (default: ``teacher_digest(teacher)``).
        batch_size: views per teacher forward (``batch_size // K`` images, at least one).
        num_workers: data loader workers that decode and crop the images.
        device: where the teacher runs and the returned cache lives (default: the teacher's device).
        progress: show a progress bar in images/s.
    """
    digest = teacher_digest if teacher_digest is not None else _digest_of(teacher)
    parts = _key_parts(spec, digest, collection.identifiers)
    expected = _sha256_json(parts)
    if key is not None and key != expected:
        raise ConfigError(f"cache key {key[:16]}... does not match the spec, teacher and images ({expected[:16]}...)")
    device = _device_of(teacher, device)
    teacher.to(device)  # the images go to ``device``; so must the teacher
    tensors = _run_teacher(teacher, collection, spec, device, batch_size, num_workers, progress)
    config = getattr(teacher, "config", None)
    metadata = {
        **parts,
        "format": FORMAT_NAME,
        "key": expected,
        "content_sha256": _content_digest(tensors),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "teacher_config": json.dumps(asdict(config) if is_dataclass(config) else None, sort_keys=True),
    }
    metadata = broadcast_object(metadata)
    if is_main():  # the processes built it together; one writes it
        _write_atomically(Path(path), tensors, metadata)
        logger.info("wrote teacher cache %s (%s images x %d views)", path, len(collection), spec.num_sets)
    barrier()
    pooled = tensors.get("pooled")
    return TeacherCache(
        tensors["embeddings"].to(device),
        None if pooled is None else pooled.to(device),
        spec,
        expected,
        metadata,
    )


def _log_other_caches(folder: Path, parts: Mapping[str, str], path: Path) -> None:
    for other in sorted(folder.glob("teacher-*.safetensors"))[:8]:
        if other == path:
            continue
        try:
            with safe_open(str(other), framework="pt") as file:
                differences = _differences(file.metadata() or {}, parts)
        except _READ_ERRORS:
            continue
        logger.info("not using teacher cache %s: %s", other, "; ".join(differences) or "other key")


def load_or_build_cache(
    teacher: nn.Module,
    collection: ImageCollection,
    spec: CacheSpec,
    folder: str | Path,
    *,
    teacher_digest: str,
    batch_size: int = 128,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> TeacherCache:
    """The valid cache ``<folder>/teacher-<key[:16]>.safetensors``, built (or rebuilt) if needed.

    A missing, unreadable, truncated, corrupt or mismatching file (another teacher, spec, image list or
    version) is rebuilt; the reason is logged. Arguments are those of ``build_cache``; the returned cache
    lives on ``device`` (default: the teacher's device).
    """
    parts = _key_parts(spec, teacher_digest, collection.identifiers)
    key = _sha256_json(parts)
    path = cache_path(folder, key)
    found = path.is_file()
    if found:
        try:
            tensors, metadata = _read_checked(path, parts, spec)
        except _READ_ERRORS as error:
            logger.warning("teacher cache %s is not usable (%s); rebuilding it", path, error)
            found = False
    (rebuild,) = any_true(not found)  # with several processes: all use the file, or all build together
    if not rebuild:
        logger.info("using teacher cache %s", path)
        device = _device_of(teacher, device)
        pooled = tensors.get("pooled")
        return TeacherCache(
            tensors["embeddings"].to(device),
            None if pooled is None else pooled.to(device),
            spec,
            key,
            metadata,
        )
    if is_main() and not path.is_file():
        _log_other_caches(Path(folder), parts, path)
    return build_cache(
        teacher,
        collection,
        spec,
        path,
        key=key,
        teacher_digest=teacher_digest,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        progress=progress,
    )


def describe_cache(path: str | Path) -> dict[str, Any]:
    """A JSON-compatible summary of a cache file read from its header (tensors are not loaded)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = dict(file.metadata() or {})
            shapes = {name: list(file.get_slice(name).get_shape()) for name in file.keys()}
        if metadata.get("format") != FORMAT_NAME or "embeddings" not in shapes:
            raise ValueError("no dmlkd teacher cache metadata")
        spec, teacher = json.loads(metadata["spec"]), json.loads(metadata.get("teacher_config", "null"))
    except (*_READ_ERRORS, json.JSONDecodeError) as error:
        raise DataError(f"{str(path)!r} is not a readable dmlkd teacher cache ({error})") from None
    pooled = shapes.get("pooled")
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "key": metadata.get("key"),
        "mode": spec.get("mode"),
        "num_images": shapes["embeddings"][0],
        "num_sets": shapes["embeddings"][1],
        "embedding_dim": shapes["embeddings"][2],
        "pooled_dim": pooled[2] if pooled else None,
        "dtype": "float16",
        "spec": spec,
        "teacher": teacher,
        **{
            name: metadata.get(name)
            for name in (
                "teacher_digest",
                "identifiers_digest",
                "dmlkd_version",
                "torch_version",
                "pillow_version",
                "created",
            )
        },
    }
