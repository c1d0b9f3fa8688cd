"""Pipeline configuration: the typed stage configs a ``dmlkd pipeline`` command runs, saved in ``pipeline.json``.

Torch-free. ``build_pipeline_config`` is the one place that turns a scenario, the command-line flags, a
``--config`` file and ``--set teacher.…/transfer.…/data.…`` items into a ``PipelineConfig``: a teacher
``TeacherConfig`` (when SRC is a model spec to train) and the students' ``TransferConfig``, each resolved like
the stage commands resolve theirs. Each student is ``transfer.with_method(name, options)``, so a recipe's
method options never follow the config to a method that does not take them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from dmlkd.config.convert import from_dict, to_dict
from dmlkd.config.overrides import apply_overrides, given_tree
from dmlkd.config.resolve import resolve_from_scratch
from dmlkd.config.sections import DataConfig
from dmlkd.config.trees import has_key, merge
from dmlkd.errors import ConfigError
from dmlkd.models.spec import parse_spec
from dmlkd.pipelines.scenarios import DEMO_TEACHER, MIN_IMAGE_SIZE, SCENARIOS, scenario
from dmlkd.teacher.config import TeacherConfig
from dmlkd.teacher.config import start_tree as teacher_start_tree
from dmlkd.transfer.config import TransferConfig
from dmlkd.transfer.config import start_tree as transfer_start_tree

_SECTIONS = ("teacher", "transfer", "data")
# Until pipeline.json format 3 the config called the teacher and the student "src" and "dst" (the CLI flags' names); a
# saved pipeline.json or a --config file with those keys is read with today's names.
_LEGACY_KEYS = {"src": "teacher_source", "dst": "student_spec"}
CONFIG_FLAGS = {"teacher_source": "--src", "student_spec": "--dst"}  # the flags that set these fields


def current_keys(tree: dict[str, Any]) -> dict[str, Any]:
    return {_LEGACY_KEYS.get(key, key): value for key, value in tree.items()}


@dataclasses.dataclass
class PipelineConfig:
    """A scenario run: the teacher (``--src``), the student spec (``--dst``), the transfer methods and the typed
    stage configs.

    ``teacher`` says how the teacher is trained when ``teacher_source`` is a model spec (None when it is a
    checkpoint, run folder or ``hf://`` reference). ``transfer`` is the students' config; student ``m`` trains
    ``transfer.with_method(m, …)`` against the resolved teacher. ``data`` is the dataset of both stages (their
    own ``data`` sections are set from it). ``teacher_check_tolerance`` is how far (absolute Recall@1) a
    re-evaluated teacher may fall below the metrics recorded with it before the pipeline stops.
    """

    scenario: str
    teacher_source: str  # --src: a model spec to train, a checkpoint or run folder, hf://… or timm/…
    student_spec: str  # --dst: the student's model spec
    methods: list[str] = dataclasses.field(default_factory=lambda: ["relaxed_contrastive"])
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    teacher: TeacherConfig | None = None
    transfer: TransferConfig = dataclasses.field(default_factory=TransferConfig)
    teacher_check_tolerance: float = 0.05
    export_format: str = "safetensors"

    def __post_init__(self) -> None:
        scenario(self.scenario)
        if not self.methods:
            raise ConfigError("--methods needs at least one transfer method")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"--methods lists a method twice: {','.join(self.methods)}")
        if not 0 <= self.teacher_check_tolerance <= 1:
            raise ConfigError(f"teacher_check_tolerance must be in [0, 1], got {self.teacher_check_tolerance}")
        if self.export_format not in ("safetensors", "onnx", "torch.export"):
            raise ConfigError(
                f"unknown export format {self.export_format!r}; choose from: onnx, safetensors, torch.export"
            )
        for name in ("teacher", "transfer"):
            stage = getattr(self, name)
            if stage is not None and to_dict(stage.data) != to_dict(self.data):
                setattr(self, name, dataclasses.replace(stage, data=self.data))

    @property
    def device(self) -> str:
        return self.transfer.train.device

    @property
    def progress(self) -> bool:
        return self.transfer.train.progress

    def teacher_is_spec(self) -> bool:
        return teacher_is_spec(self.teacher_source)


def teacher_is_spec(src: str) -> bool:
    """Whether ``--src`` names a model to train (or find in the zoo), not a checkpoint, run folder, Hub repository or
    published timm model (``timm/NAME[.TAG][@REV]``, used as is: stage 1 is skipped)."""
    return not (src.startswith(("hf://", "timm/")) or Path(src).expanduser().exists())


def split_sets(items: tuple[str, ...] | list[str]) -> dict[str, list[str]]:
    """``--set teacher.optim.lr=1e-3`` goes to the teacher stage, ``transfer.…`` to the students and
    ``data.…`` (e.g. ``data.options.verify_counts=false``) to the dataset both stages read."""
    sections: dict[str, list[str]] = {name: [] for name in _SECTIONS}
    for item in items:
        section, _, rest = item.partition(".")
        if section not in _SECTIONS or not rest:
            raise ConfigError(
                f"--set {item!r}: pipeline overrides start with teacher., transfer. or data., "
                "e.g. teacher.optim.lr=1e-3 or transfer.train.epochs=10"
            )
        sections[section].append(rest)
    return sections


def default_src(name: str, dataset: str) -> str:
    """The scenario's teacher spec; the demo data has its own for compress (see ``DEMO_TEACHER``)."""
    if dataset == "glyphs" and name in DEMO_TEACHER:
        return DEMO_TEACHER[name]
    return SCENARIOS[name].teacher


def _image_size_items(arch: str, dataset: str) -> list[str]:
    """Small demo images are upscaled for backbones that cannot run on them (BN-Inception at 32 px)."""
    minimum = MIN_IMAGE_SIZE.get(arch)
    if minimum and dataset == "glyphs":
        return [f"train.image_size={minimum}", f"eval.image_size={minimum}"]
    return []


def _at_teacher_size(tree: dict[str, Any], teacher: TeacherConfig | None) -> dict[str, Any]:
    """The students' start tree with their views at the size the pipeline trains the teacher at, which sees
    the same views (a 64 px teacher is not run on 32 px demo views), where the two differ. It sits below the
    ``--config`` file, the flags and ``--set``; evaluation follows the training size unless one is given."""
    size = teacher.train.image_size if teacher is not None else None
    if size is None or tree.get("train", {}).get("image_size") == size:
        return tree
    return merge(tree, {"train": {"image_size": size}})


def build_pipeline_config(
    name: str,
    *,
    src: str | None,
    dst: str | None,
    methods: list[str] | None,
    data: dict[str, Any],
    teacher_items: list[str],
    transfer_items: list[str],
    sets: tuple[str, ...] | list[str] = (),
    file_tree: dict[str, Any] | None = None,
    export_format: str | None = None,
) -> tuple[PipelineConfig, list[str]]:
    """The pipeline config of a command line (see the module docstring); returns it and notes on values
    resolved on the user's behalf. Precedence, lowest first: scenario and recipes, the ``--config`` file,
    the flags, ``--set``."""
    file_tree = current_keys(file_tree or {})
    unknown = sorted(set(file_tree) - {f.name for f in dataclasses.fields(PipelineConfig)})
    if unknown:
        raise ConfigError(
            f"unknown pipeline config key {unknown[0]}; valid keys: "
            + ", ".join(f.name for f in dataclasses.fields(PipelineConfig))
        )
    sections = split_sets(sets)
    data_tree = apply_overrides(
        merge(file_tree.get("data", {}), {k: v for k, v in data.items() if v is not None}), sections["data"]
    )
    data_config = from_dict(DataConfig, data_tree)
    dataset = data_config.name
    src = src or file_tree.get("teacher_source") or default_src(name, dataset)
    dst = dst or file_tree.get("student_spec") or SCENARIOS[name].student
    methods = methods or file_tree.get("methods") or ["relaxed_contrastive"]
    common = [
        f"data={json.dumps(to_dict(data_config))}",
    ]
    notes: list[str] = []
    teacher: TeacherConfig | None = None
    if teacher_is_spec(src):
        spec = parse_spec(src)
        items = [
            f"model.arch={json.dumps(spec.arch)}",
            f"model.embedding_dim={spec.dim}",
            *common,
            *_image_size_items(spec.arch, dataset),
        ]
        given = given_tree(file_tree.get("teacher") or {}, [*items, *teacher_items, *sections["teacher"]])
        tree = merge(teacher_start_tree(None, dataset, spec.arch), given)
        tree, teacher_notes = resolve_from_scratch(tree, given, "model")
        notes += [f"teacher {note}" for note in teacher_notes]
        teacher = from_dict(TeacherConfig, tree)
    spec = parse_spec(dst)
    items = [
        f"student.arch={json.dumps(spec.arch)}",
        f"student.embedding_dim={spec.dim}",
        *common,
        *_image_size_items(spec.arch, dataset),
    ]
    given = given_tree(file_tree.get("transfer") or {}, [*items, *transfer_items, *sections["transfer"]])
    tree = merge(_at_teacher_size(transfer_start_tree(None, dataset), teacher), given)
    if tree.get("transfer_set") and not has_key(given, "train.ipc"):
        tree.setdefault("train", {})["ipc"] = None  # unlabeled images: random batches, as transfer train does
    tree, student_notes = resolve_from_scratch(tree, given, "student")
    notes += [f"students {note}" for note in student_notes]
    transfer = from_dict(TransferConfig, tree)
    rest = {k: v for k, v in file_tree.items() if k in ("teacher_check_tolerance", "export_format")}
    if export_format is not None:
        rest["export_format"] = export_format
    config = PipelineConfig(
        scenario=name,
        teacher_source=src,
        student_spec=dst,
        methods=list(methods),
        data=data_config,
        teacher=teacher,
        transfer=transfer,
        **rest,
    )
    return config, notes
