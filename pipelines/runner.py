"""Run a scenario end to end: teacher (pull or train) -> teacher check -> students -> export -> report.

Every step records its completion in ``<out>/pipeline.json``; rerunning the same command skips finished
steps and resumes an interrupted training run from its saved state. A different command on an existing
folder is refused unless ``overwrite`` is set.

Under a launcher (``torchrun``, ``accelerate launch``) every process runs the pipeline: the training stages
run on all of them (the global-batch contract of ``dmlkd.engine.distributed``), while the folder bookkeeping,
downloads, the teacher check, the export and the report run on the main process, whose results (and errors)
every process receives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dmlkd.checkpoints.folder import is_timm_ref, read_checkpoint_config, save_checkpoint
from dmlkd.checkpoints.io import check_model_ref, load_checkpoint, resolve_checkpoint_dir
from dmlkd.checkpoints.timm_hub import load_hub_model
from dmlkd.checkpoints.zoo import find_teacher
from dmlkd.config.convert import from_dict, to_dict
from dmlkd.config.sections import EvalConfig
from dmlkd.data.catalog import build_splits
from dmlkd.devices import resolve_device
from dmlkd.engine.distributed import call_on_main, init_processes, is_main, launched
from dmlkd.engine.run_layout import failed_without_progress
from dmlkd.engine.run_record import read_run
from dmlkd.engine.rundir import RUNTIME_KEYS, sigterm_as_interrupt
from dmlkd.engine.tracking import progress_logger
from dmlkd.errors import DmlkdError
from dmlkd.evaluation.run import evaluate_model
from dmlkd.inference.export import export_model
from dmlkd.models.spec import parse_spec
from dmlkd.pipelines.config import PipelineConfig
from dmlkd.pipelines.report import ReportEntry, write_report
from dmlkd.pipelines.state import PipelineState
from dmlkd.registry import DATASETS, TRANSFER_METHODS
from dmlkd.teacher.trainer import run_teacher
from dmlkd.transfer.config import TransferConfig
from dmlkd.transfer.trainer import run_transfer

log = logging.getLogger(__name__)


class TeacherCheckError(DmlkdError):
    """The teacher re-evaluates far below the metrics recorded in its checkpoint."""


def student_config(config: PipelineConfig, teacher_ref: Path | str, method: str) -> TransferConfig:
    """The config of the student trained with ``method``: the pipeline's transfer config, that method (its
    options only), and the resolved teacher."""

    options = TRANSFER_METHODS.options(method)
    return config.transfer.with_method(method, options).with_teacher(str(teacher_ref))


def _should_resume(run_dir: Path) -> bool:

    existing = read_run(run_dir)
    return existing is not None and not failed_without_progress(run_dir, existing)


def _runtime_given(tree: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed stage takes from this command (progress bars, workers): see ``RUNTIME_KEYS``."""

    given: dict[str, Any] = {}
    for dotted in RUNTIME_KEYS:
        section, key = dotted.split(".")
        if key in tree.get(section, {}):
            given.setdefault(section, {})[key] = tree[section][key]
    return given


def _train_stage(run_dir: Path, run: Callable[..., Any], config: Any, state: PipelineState) -> Any:
    """Train one stage into ``run_dir``, resuming it if an earlier attempt was interrupted.

    An attempt that failed before writing any checkpoint or state starts again from scratch.
    """

    resume = call_on_main(_should_resume, run_dir)  # decided once, before the main process writes run.json
    given = _runtime_given(to_dict(config)) if resume else None
    return run(config, run_dir, resume=resume, given=given, on_saved=state.saved)


def _header(text: str) -> None:
    """A step header on stdout (main process): what the pipeline is doing now, also under nohup."""

    if is_main():
        progress_logger().info("== pipeline: %s", text)


def resolve_teacher(config: PipelineConfig, state: PipelineState) -> Path:
    """The checkpoint folder for SRC: a local folder, an ``hf://`` reference, a zoo entry or a new teacher."""

    src = config.teacher_source

    if is_timm_ref(src):  # a published timm model, used as is (no head): stage 1 is skipped
        return call_on_main(_save_hub_teacher, src, state.out / "teacher")
    if src.startswith("hf://") or Path(src).expanduser().exists():
        return call_on_main(resolve_checkpoint_dir, src if src.startswith("hf://") else Path(src).expanduser())

    spec = parse_spec(src)

    entry = find_teacher(config.data.name, str(spec))
    if entry is not None:
        log.info("pretrained teacher for %s on %s from the zoo: %s", spec, config.data.name, entry)
        return call_on_main(resolve_checkpoint_dir, entry.reference)  # one download
    run_dir = state.out / "teacher"
    if not state.done("teacher"):
        _header(f"teacher: training {src} on {config.data.name} into {run_dir}")

        assert config.teacher is not None  # a model spec SRC always has a teacher config
        result = _train_stage(run_dir, run_teacher, config.teacher, state)
        state.finish("teacher", run_dir=str(run_dir), seconds=round(result.fit.seconds, 1))
    return call_on_main(resolve_checkpoint_dir, run_dir)


def _save_hub_teacher(src: str, folder: Path) -> Path:
    """Write the published timm teacher ``src`` as a checkpoint folder (once; kept when a run resumes)."""

    if (folder / "config.json").is_file() and read_checkpoint_config(folder)["provenance"].get("source") == src:
        return folder
    model, record = load_hub_model(src)
    return save_checkpoint(folder, model, provenance=record["provenance"])


def check_teacher(config: PipelineConfig, teacher_dir: Path, state: PipelineState) -> dict[str, Any]:
    """Re-evaluate the teacher (on the main process); stop if it falls far below the metrics recorded with it."""

    if (done := state.done("teacher_check")) is not None:
        return done
    _header(f"teacher check: re-evaluating {teacher_dir} on {config.data.name}")
    info = call_on_main(_measure_teacher, config, teacher_dir)
    state.finish("teacher_check", **info)
    return info


def _measure_teacher(config: PipelineConfig, teacher_dir: Path) -> dict[str, Any]:

    model, record = load_checkpoint(teacher_dir)
    recorded = record.get("metrics", {})
    train_config = record.get("train_config", {})
    eval_tree = dict(train_config.get("eval", {}))
    eval_tree["nmi"] = False
    if train_config.get("train", {}).get("image_size") and not eval_tree.get("image_size"):
        eval_tree["image_size"] = train_config["train"]["image_size"]
    eval_config = from_dict(EvalConfig, {k: v for k, v in eval_tree.items() if k != "second_metric"})
    splits, _ = build_splits(config.data)
    device = resolve_device(config.device)
    measured = evaluate_model(model.to(device), splits, eval_config, device, progress=config.progress)
    expected = recorded.get("recall@1")
    info = {
        "teacher": str(teacher_dir),
        "recall@1": measured["recall@1"],
        "recorded_recall@1": expected,
        "metric": eval_config.metric,
    }
    if expected is None:
        log.warning("teacher %s records no Recall@1; skipping the sanity check", teacher_dir)
    elif measured["recall@1"] < expected - config.teacher_check_tolerance:
        raise TeacherCheckError(
            f"teacher {str(teacher_dir)!r} re-evaluates at Recall@1 {100 * measured['recall@1']:.1f} on "
            f"{config.data.name}, far below the {100 * expected:.1f} recorded with it: wrong dataset, "
            "preprocessing or weights (the weights may not have loaded); check the teacher and --dataset"
        )
    return info


def train_students(config: PipelineConfig, teacher_dir: Path, state: PipelineState) -> list[Path]:

    run_dirs = []
    for method in config.methods:
        run_dir = state.out / "students" / method
        if not state.done(f"student:{method}"):
            position = f"{config.methods.index(method) + 1}/{len(config.methods)}"
            _header(f"student {position}: {config.student_spec} with {method}")
            result = _train_stage(run_dir, run_transfer, student_config(config, teacher_dir, method), state)
            state.finish(
                f"student:{method}",
                run_dir=str(run_dir),
                teacher_mode=result.teacher_mode,
                seconds=round(result.fit.seconds, 1),
            )
        run_dirs.append(run_dir)
    return run_dirs


def export_students(config: PipelineConfig, run_dirs: list[Path], state: PipelineState) -> list[Path]:

    exported = []
    for method, run_dir in zip(config.methods, run_dirs):
        target = state.out / "exports" / method
        if not state.done(f"export:{method}"):
            _header(f"export: {method}, {run_dir}/last (final step), as {config.export_format} into {target}")
            call_on_main(export_model, str(run_dir), target, config.export_format, overwrite=True)
            state.finish(f"export:{method}", path=str(target), format=config.export_format)
        exported.append(target)
    return exported


def make_report(config: PipelineConfig, teacher_dir: Path, run_dirs: list[Path], state: PipelineState) -> dict:

    _header(f"writing the report ({state.out / 'report.md'}): the teacher and {len(run_dirs)} student(s) evaluated")

    results = call_on_main(_write_report, config, teacher_dir, run_dirs, state)
    state.finish("report", path=str(state.out / "report.md"))
    return results


def _write_report(config: PipelineConfig, teacher_dir: Path, run_dirs: list[Path], state: PipelineState) -> dict:

    teacher_run = teacher_dir.parent if teacher_dir.name in ("best", "last") else teacher_dir
    entries = [ReportEntry("teacher", "teacher", teacher_run)]
    for method, run_dir in zip(config.methods, run_dirs):
        mode = (state.done(f"student:{method}") or {}).get("teacher_mode")
        entries.append(ReportEntry(method, "student", run_dir, method=method, teacher_mode=mode))
    splits, _ = build_splits(config.data)
    eval_config = from_dict(EvalConfig, to_dict(config.transfer.eval))
    return write_report(
        state.out,
        config.scenario,
        config.data.name,
        splits,
        entries,
        eval_config,
        resolve_device(config.device),
        progress=config.progress,
    )


def run_pipeline(
    config: PipelineConfig, out: Path, overwrite: bool = False, regenerate_report: bool = False
) -> dict[str, Any]:
    """Run (or resume) a pipeline into ``out``; returns the report's results (on every process).

    The folder is locked for the whole run; ``overwrite`` keeps the old pipeline until the new one saved
    its first state (see ``dmlkd.pipelines.state``). ``regenerate_report`` writes the report again.
    """

    if launched():
        init_processes(config.device)
    opened: dict[str, PipelineState] = {}

    def open_state() -> dict[str, Any]:
        opened["state"] = PipelineState.open(out, config, overwrite)
        return opened["state"].record

    record = call_on_main(open_state)
    state = opened.get("state") or PipelineState(Path(out), record, None, None)
    try:
        with sigterm_as_interrupt():
            if regenerate_report:
                state.record["steps"].pop("report", None)
            teacher_dir = resolve_teacher(config, state)
            check_teacher(config, teacher_dir, state)
            run_dirs = train_students(config, teacher_dir, state)
            export_students(config, run_dirs, state)
            return make_report(config, teacher_dir, run_dirs, state)
    finally:
        if is_main():
            state.close()


def validate_pipeline(config: PipelineConfig) -> None:
    """Fail before any training on names that cannot work (one-line errors); the stage configs are typed
    already, and each stage validates its data and options again before its run folder is touched."""

    DATASETS.get(config.data.name)

    if is_timm_ref(config.teacher_source):
        check_model_ref(config.teacher_source)  # malformed, unknown or weights not reachable: one line, before training
    for method in config.methods:
        student_config(config, "teacher", method)
