"""Configuration as plain, typed data.

Configs are nested dataclasses built from JSON-compatible dictionaries. Nothing in a config is ever
executed or imported: values are parsed as data only (``json``), checked against the dataclass field types
and rejected with the dotted path of the bad key. ``--set a.b=value`` overrides are applied to the
dictionary before conversion, so a config file, a recipe and the command line all go through one strict
path. This module is torch-free.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from dmlkd.errors import ConfigError, choices

C = TypeVar("C")


def parse_value(text: str) -> Any:
    """Parse an override value: JSON when it parses (``3``, ``1e-4``, ``true``, ``[1,2]``), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree["a"]["b"] = value`` for ``key == "a.b"``, creating intermediate dictionaries."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"malformed key {key!r} in --set; expected dotted names such as optim.lr")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``KEY=VALUE`` strings to a (deep-copied) config dictionary."""
    result = json.loads(json.dumps(tree))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        set_dotted(result, key.strip(), parse_value(value.strip()))
    return result


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not valid; choose from: {choices(map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a section (mapping), got {value!r}")
        return from_dict(tp, value, prefix=f"{path}.")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [_convert(item, item_type, f"{path}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported field type {_type_name(tp)}")


def from_dict(cls: type[C], data: Mapping[str, Any], prefix: str = "") -> C:
    """Build dataclass ``cls`` from ``data`` strictly: unknown keys and wrong types are ``ConfigError``."""
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [key for key in data if key not in fields]
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}; valid keys here: {choices(prefix + n for n in fields)}"
        )
    kwargs = {name: _convert(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing config key(s) {', '.join(prefix + name for name in missing)}")
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ConfigError(f"{prefix or cls.__name__}: {error}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """The JSON-compatible dictionary of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def load_config(cls: type[C], base: Mapping[str, Any] | None = None, overrides: Sequence[str] = ()) -> C:
    """Merge ``base`` (defaults already applied by the caller) with ``--set`` overrides, then convert."""
    tree = apply_overrides(dict(base or {}), overrides)
    return from_dict(cls, tree)


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from ``path``; a missing or malformed file is a ``ConfigError`` naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a JSON object")
    return data


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of two config dictionaries; values of ``update`` win."""
    result = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merge(result[key], value)
        else:
            result[key] = value
    return result


# ---------------------------------------------------------------------------------------------------------
# Sections shared by several commands. Stage configs (teacher, transfer) build on these.


@dataclasses.dataclass
class DataConfig:
    """Which dataset to read and how.

    ``name`` is a registered dataset (``dmlkd datasets`` lists them); ``root`` its folder (or CSV file);
    ``options`` are passed to the reader (e.g. ``{"verify_counts": false}``); ``skip_bad_images`` drops
    unreadable images (listing them) instead of stopping at the first one.
    """

    name: str = "glyphs"
    root: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    skip_bad_images: bool = False


@dataclasses.dataclass
class EvalConfig:
    """Retrieval evaluation settings (``dmlkd eval`` and evaluation during training)."""

    metric: typing.Literal["cosine", "euclidean"] = "cosine"
    ks: list[int] | None = None  # None: the dataset's customary K values
    image_size: int | None = None  # None: the dataset's default (224 for the public datasets)
    batch_size: int = 128
    num_workers: int = 0
    backend: typing.Literal["auto", "torch", "faiss"] = "auto"
    nmi: bool = True
    seed: int = 0
    # Also report Recall@K under this metric (from the same embeddings), under keys "<metric>/recall@K".
    second_metric: typing.Literal["cosine", "euclidean"] | None = None

    def __post_init__(self) -> None:
        if self.image_size is not None and self.image_size <= 0:
            raise ConfigError(f"eval.image_size must be a positive integer, got {self.image_size}")
        if self.batch_size <= 0:
            raise ConfigError(f"eval.batch_size must be a positive integer, got {self.batch_size}")
        if self.ks is not None and (not self.ks or any(k <= 0 for k in self.ks)):
            raise ConfigError(f"eval.ks must be a non-empty list of positive integers, got {self.ks}")


@dataclasses.dataclass
class EvalCommandConfig:
    """Everything ``dmlkd eval`` needs."""

    checkpoint: str = ""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    device: str = "auto"


@dataclasses.dataclass
class OptimConfig:
    """Optimiser, schedule and the reference's warm-up / BN-freeze semantics (seed-spec §4, §5)."""

    optimizer: typing.Literal["adamw", "sgd", "adam"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    backbone_lr_mult: float = 1.0
    head_lr_mult: float = 1.0
    loss_lr_mult: float | None = None  # None: the loss's own default (Proxy-Anchor proxies: 100)
    clip_grad_value: float | None = 10.0
    clip_grad_norm: float | None = None
    scheduler: typing.Literal["step", "cosine", "none"] = "step"
    lr_decay_step: int = 10
    lr_decay_gamma: float = 0.5
    warmup_epochs: int = 0
    bn_freeze: bool = False
    # The reference re-enables the BN affine parameters frozen by bn_freeze when warm-up ends (seed-spec §4).
    # False gives the corrected behaviour: frozen BN parameters stay frozen.
    warmup_unfreezes_bn: bool = True

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight decay must be >= 0, got {self.weight_decay}")
        for name in ("backbone_lr_mult", "head_lr_mult", "loss_lr_mult", "clip_grad_value", "clip_grad_norm"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"optim.{name} must be >= 0, got {value}")
        if self.lr_decay_step <= 0 or not 0 < self.lr_decay_gamma <= 1:
            raise ConfigError(
                f"optim.lr_decay_step must be > 0 and lr_decay_gamma in (0, 1], "
                f"got {self.lr_decay_step} and {self.lr_decay_gamma}"
            )
        if self.warmup_epochs < 0:
            raise ConfigError(f"optim.warmup_epochs must be >= 0, got {self.warmup_epochs}")


@dataclasses.dataclass
class TrainConfig:
    """Batching, length and run-control settings shared by the teacher and transfer stages.

    The batch is global: ``batch_size`` distinct images per optimiser step (before views), drawn as
    ``batch_size / ipc`` classes x ``ipc`` images when ``ipc`` is set, else uniformly at random.
    """

    epochs: int = 60
    max_steps: int | None = None
    batch_size: int = 180
    ipc: int | None = None
    views: int = 1
    sampler_mode: typing.Literal["reference", "cover"] = "reference"
    image_size: int | None = None  # None: the dataset's default (224 for the public datasets)
    crop_scale: list[float] | None = None  # None: the dataset's default ((0.08, 1.0) = RandomResizedCrop)
    seed: int = 1
    mixed_precision: typing.Literal["no", "fp16", "bf16"] = "no"
    num_workers: int = 0
    eval_every: int = 1
    save_every: int | None = None  # optimiser steps between resumable states (None: at each epoch end)
    device: str = "auto"
    progress: bool = True
    eval_at_start: bool = False  # also evaluate the untrained network (epoch 0) for comparison
    on_nonfinite: typing.Literal["stop", "skip"] = "stop"  # a NaN/inf loss stops the run, or skips the step
    sync_bn: bool = False  # SyncBatchNorm across processes (GPU/NCCL only)
    # Training views: "reduced" = uint8 views, JPEGs decoded at reduced size where the crop allows it (the
    # default); "baseline" = full decode, float32 views made in the workers (the previous path).
    data_path: typing.Literal["reduced", "baseline"] = "reduced"
    # torch.use_deterministic_algorithms(True) (+ cuDNN/cuBLAS settings on a GPU): slower, reproducible on GPUs
    deterministic: bool = False

    def __post_init__(self) -> None:
        positive = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "views": self.views,
            "eval_every": self.eval_every,
        }
        optional_positive = {
            "max_steps": self.max_steps,
            "ipc": self.ipc,
            "image_size": self.image_size,
            "save_every": self.save_every,
        }
        for name, value in {**positive, **optional_positive}.items():
            if value is not None and value <= 0:
                raise ConfigError(f"{name.replace('_', '-')} must be a positive integer, got {value}")
        if self.num_workers < 0:
            raise ConfigError(f"num-workers must be >= 0, got {self.num_workers}")
        if self.ipc is not None and self.ipc > self.batch_size:
            raise ConfigError(
                f"ipc {self.ipc} is larger than the batch size {self.batch_size}; a batch holds P classes x "
                f"ipc images, so use a batch size that is a multiple of ipc (e.g. {2 * self.ipc})"
            )
        if self.ipc is not None and self.batch_size % self.ipc:
            raise ConfigError(
                f"batch size {self.batch_size} is not a multiple of ipc {self.ipc}; "
                f"a batch holds P classes x ipc images"
            )
        if self.crop_scale is not None and (
            len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1
        ):
            raise ConfigError(f"crop_scale must be [min, max] with 0 < min <= max <= 1, got {self.crop_scale}")
