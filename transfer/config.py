"""Transfer-stage configuration and the reference recipes (seed-spec §5.2) as named presets. Torch-free."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Collection
from typing import Any

from dmlkd.config.convert import from_dict
from dmlkd.config.overrides import given_tree
from dmlkd.config.resolve import resolve_from_scratch
from dmlkd.config.sections import DataConfig, EvalConfig, OptimConfig, TrainConfig
from dmlkd.config.trees import has_key, merge
from dmlkd.errors import ConfigError, choices
from dmlkd.models.spec import ModelConfig

TeacherMode = typing.Literal["auto", "online", "cached", "clean"]


@dataclasses.dataclass
class MethodConfig:
    """A registered transfer method and its options (e.g. ``{"sigma": 1.0, "delta": 1.0}``)."""

    name: str = "relaxed_contrastive"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TeacherSourceConfig:
    """Where the frozen teacher comes from and how its outputs reach the loss.

    ``mode``: ``online`` runs the teacher on every step on the same augmented views (exact parity with the
    paper's code); ``cached`` replays K pre-drawn views per image from an exact-replay cache; ``clean`` caches
    only the deterministic eval view (cheapest, but a different method: the teacher sees another view than
    the student); ``auto`` is ``online`` for training (docs/benchmarks.md, "Teacher cache diversity") and
    ``cached`` for ``dmlkd cache build``. ``cache_refresh_epochs`` E > 0 re-draws the K cached views every E
    epochs (``K * N`` teacher passes per refresh).
    """

    ref: str = ""
    mode: TeacherMode = "auto"
    cache_views: int = 8
    cache_dir: str | None = None  # None: <dmlkd cache folder>/teacher-outputs
    cache_batch_size: int = 128
    cache_refresh_epochs: int = 0  # > 0: re-draw the K cached views every E epochs (diversity, at K*N per E)

    def __post_init__(self) -> None:
        if self.cache_views <= 0:
            raise ConfigError(f"cache-views must be a positive integer, got {self.cache_views}")
        if self.cache_refresh_epochs < 0:
            raise ConfigError(f"cache-refresh-epochs must be >= 0 (0: never), got {self.cache_refresh_epochs}")
        if self.cache_batch_size <= 0:
            raise ConfigError(f"teacher.cache_batch_size must be a positive integer, got {self.cache_batch_size}")


@dataclasses.dataclass
class TransferConfig:
    """Everything ``dmlkd transfer train`` needs; saved resolved as ``run_config.json`` in the run folder."""

    teacher: TeacherSourceConfig = dataclasses.field(default_factory=TeacherSourceConfig)
    student: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(arch="resnet18", embedding_dim=128))
    method: MethodConfig = dataclasses.field(default_factory=MethodConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    recipe: str | None = None
    # A folder of unlabeled images to train on instead of data's train split (label-free methods only; see
    # dmlkd.transfer.transfer_set); data still gives the test split.
    transfer_set: str | None = None

    def with_method(self, name: str, accepted: Collection[str]) -> TransferConfig:
        """This config for transfer method ``name``: options the new method does not take are dropped.

        ``accepted`` is the method's option names (``TRANSFER_METHODS.options(name)``); a recipe's
        relaxed-contrastive ``sigma``/``delta`` do not follow the config to RKD.
        """
        kwargs = {key: value for key, value in self.method.kwargs.items() if key in accepted}
        return dataclasses.replace(self, method=MethodConfig(name=name, kwargs=kwargs))

    def with_teacher(self, ref: str) -> TransferConfig:
        return dataclasses.replace(self, teacher=dataclasses.replace(self.teacher, ref=ref))


def _lr(dataset: str, epochs: int) -> dict[str, Any]:
    """The LR README command: batch 90 = 45 classes x IPC 2, 2 views, AdamW 1e-4, cosine, raw student."""
    return {
        "student": {
            "arch": "resnet18",
            "embedding_dim": 128,
            "l2_norm": False,
            "head_init": "orthogonal",
            "pretrained": True,
        },
        "method": {"name": "relaxed_contrastive", "kwargs": {"sigma": 1.0, "delta": 1.0}},
        "data": {"name": dataset},
        "optim": {
            "optimizer": "adamw",
            "lr": 1e-4,
            "weight_decay": 1e-4,
            "scheduler": "cosine",
            "clip_grad_value": None,
            "warmup_epochs": 0,
            "bn_freeze": False,
        },
        "train": {"epochs": epochs, "batch_size": 90, "ipc": 2, "views": 2, "seed": 0, "image_size": 224},
        "eval": {"metric": "euclidean", "second_metric": "cosine"},
    }


RECIPES: dict[str, dict[str, Any]] = {
    "lr-cub": _lr("cub", 90),
    "lr-cars": _lr("cars", 90),
    "lr-sop": _lr("sop", 150),
    # The built-in demo: minutes on 2 CPU cores, student from scratch.
    "demo-glyphs": merge(
        _lr("glyphs", 4),
        {
            "student": {"embedding_dim": 64, "pretrained": False},
            "optim": {"lr": 1e-3},
            "train": {"batch_size": 64, "image_size": None, "eval_at_start": False},
        },
    ),
}


def default_recipe(dataset: str | None) -> str | None:
    if dataset in (None, "glyphs"):
        return "demo-glyphs"
    name = f"lr-{dataset}"
    return name if name in RECIPES else None


def start_tree(recipe_name: str | None, dataset: str | None) -> dict[str, Any]:
    """The config tree before command-line overrides: the named or default recipe (LR defaults otherwise)."""
    name = recipe_name or default_recipe(dataset)
    if name is not None and name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose from: {choices(RECIPES)}")
    tree = merge({}, RECIPES[name]) if name else merge(_lr(dataset or "glyphs", 90), {})
    tree["recipe"] = name
    return tree


def resolve_transfer_config(
    recipe_name: str | None, file_tree: dict[str, Any] | None, items: list[str]
) -> tuple[TransferConfig, dict[str, Any], list[str]]:
    """The transfer config of a command: recipe, then the ``--config`` file, then flags and ``--set`` items.

    A recipe's method options belong to the recipe's method: with another method only the options given
    explicitly are kept.
    """
    given = given_tree(file_tree, items)
    name = recipe_name or given.get("recipe")
    start = start_tree(name, given.get("data", {}).get("name"))
    tree = merge(start, given)
    if tree["method"]["name"] != start["method"]["name"]:
        tree["method"]["kwargs"] = dict(given.get("method", {}).get("kwargs", {}))
    mode = tree.get("teacher", {}).get("mode", "auto")
    if mode in ("online", "clean") and has_key(given, "teacher.cache_views"):
        raise ConfigError(
            f"--cache-views applies to the cached teacher only, but the teacher mode is {mode}; "
            "drop --cache-views or use --teacher-mode cached"
        )
    tree, notes = resolve_from_scratch(tree, given, "student")
    if tree.get("transfer_set") and not has_key(given, "train.ipc"):
        tree.setdefault("train", {})["ipc"] = None  # no classes to sample P x K from: random batches
    return from_dict(TransferConfig, tree), given, notes
