"""Run a scenario end to end: teacher (pull or train) -> teacher check -> students -> export -> report.

Every stage records its completion in ``<out>/pipeline.json``; rerunning the same command skips finished
stages and resumes an interrupted training run from its saved state. A different command on an existing
folder is refused unless ``overwrite`` is set.

Under a launcher (``torchrun``, ``accelerate launch``) every process runs the pipeline: the training stages
run on all of them (the global-batch contract of ``dmlkd.engine.distributed``), while the folder bookkeeping,
downloads, the teacher check, the export and the report run on the main process, whose results (and errors)
every process receives.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dmlkd import __version__
from dmlkd.config import apply_overrides, from_dict, to_dict
from dmlkd.errors import ConfigError, DmlkdError
from dmlkd.pipelines.config import PipelineConfig
from dmlkd.pipelines.scenarios import MIN_IMAGE_SIZE

log = logging.getLogger(__name__)

STATE_FILE = "pipeline.json"
_PIPELINE_CONTENT = {
    STATE_FILE,
    "teacher",
    "students",
    "exports",
    "report.md",
    "results.json",
    "recall_per_epoch.png",
    "recall_at_k.png",
    "retrieval_grid.png",
}


class TeacherCheckError(DmlkdError):
    """The teacher re-evaluates far below the metrics recorded in its checkpoint."""


class PipelineState:
    """``pipeline.json``: the pipeline's config and which stages have finished."""

    def __init__(self, out: Path, record: dict[str, Any]) -> None:
        self.out = out
        self.record = record

    @classmethod
    def open(cls, out: Path, config: PipelineConfig, overwrite: bool) -> PipelineState:
        out = Path(out)
        wanted = to_dict(config)
        path = out / STATE_FILE
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("config") == wanted and not overwrite:
                return cls(out, record)
            if not overwrite:
                difference = _first_difference(record.get("config", {}), wanted)
                raise ConfigError(
                    f"{str(out)!r} holds a pipeline run with different options ({difference}); "
                    "rerun the same command to resume it, or pass --overwrite to replace it"
                )
            _clear(out)
        elif out.exists() and any(out.iterdir()):
            raise ConfigError(
                f"output folder {str(out)!r} is not empty and holds no dmlkd pipeline; "
                "choose an empty or new --out folder"
            )
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"cannot create output folder {str(out)!r}: {error.strerror}") from None
        state = cls(out, {"format": 1, "dmlkd_version": __version__, "config": wanted, "stages": {}})
        state.save()
        return state

    def save(self) -> None:
        from dmlkd.engine.distributed import is_main

        if not is_main():  # every process keeps the record in memory; the main process writes it
            return
        tmp = self.out / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(self.record, indent=2) + "\n")
        os.replace(tmp, self.out / STATE_FILE)

    def done(self, stage: str) -> dict[str, Any] | None:
        return self.record["stages"].get(stage)

    def finish(self, stage: str, **info: Any) -> None:
        self.record["stages"][stage] = {"status": "done", **info}
        self.save()


def _first_difference(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    for key in sorted(set(old) | set(new)):
        if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
            found = _first_difference(old[key], new[key], f"{prefix}{key}.")
            if found:
                return found
        elif old.get(key) != new.get(key):
            return f"{prefix}{key}: {json.dumps(old.get(key))} before, {json.dumps(new.get(key))} now"
    return ""


def _clear(out: Path) -> None:
    for child in out.iterdir():
        if child.name in _PIPELINE_CONTENT:
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def _image_size_overrides(arch: str, dataset: str) -> list[str]:
    """Small demo images are upscaled for backbones that cannot run on them (BN-Inception at 32 px)."""
    minimum = MIN_IMAGE_SIZE.get(arch)
    if minimum and dataset == "glyphs":
        return [f"train.image_size={minimum}", f"eval.image_size={minimum}"]
    return []


def _common(config: PipelineConfig) -> list[str]:
    items = [
        f"data.name={json.dumps(config.data.name)}",
        f"data.options={json.dumps(config.data.options)}",
        f"data.skip_bad_images={json.dumps(config.data.skip_bad_images)}",
        f"train.device={json.dumps(config.device)}",
        f"train.progress={json.dumps(config.progress)}",
    ]
    if config.data.root:
        items.append(f"data.root={json.dumps(config.data.root)}")
    return items


def teacher_config_tree(config: PipelineConfig) -> dict[str, Any]:
    from dmlkd.models.spec import parse_spec
    from dmlkd.teacher.config import start_tree

    spec = parse_spec(config.src)
    items = [
        f"model.arch={json.dumps(spec.arch)}",
        f"model.embedding_dim={spec.dim}",
        *_common(config),
        *_image_size_overrides(spec.arch, config.data.name),
        *config.teacher_overrides,
    ]
    return apply_overrides(start_tree(None, config.data.name, spec.arch), items)


def student_config_tree(config: PipelineConfig, teacher_ref: Path, method: str) -> dict[str, Any]:
    from dmlkd.models.spec import parse_spec
    from dmlkd.transfer.config import start_tree

    spec = parse_spec(config.dst)
    items = [
        f"teacher.ref={json.dumps(str(teacher_ref))}",
        f"student.arch={json.dumps(spec.arch)}",
        f"student.embedding_dim={spec.dim}",
        f"method.name={json.dumps(method)}",
        *_common(config),
        *_image_size_overrides(spec.arch, config.data.name),
        *config.transfer_overrides,
    ]
    return apply_overrides(start_tree(None, config.data.name), items)


def _train_stage(
    run_dir: Path, stage: str, tree: dict[str, Any], train: Callable[[Any, Path, bool], Any], config_cls: type
) -> Any:
    """Train one stage into ``run_dir``, resuming it if an earlier attempt was interrupted.

    An attempt that failed before writing any checkpoint or state starts again from scratch.
    """
    from dmlkd.engine.distributed import call_on_main, prepare_run_dir_on_main

    config = from_dict(config_cls, tree)
    resume = call_on_main(_should_resume, run_dir)  # decided once, before the main process writes run.json
    run_dir, tree = prepare_run_dir_on_main(
        config.train.device, run_dir, stage, to_dict(config), resume=resume, overwrite=False
    )
    return train(from_dict(config_cls, tree), run_dir, resume)


def _should_resume(run_dir: Path) -> bool:
    from dmlkd.engine.rundir import failed_without_progress, read_run

    existing = read_run(run_dir)
    return existing is not None and not failed_without_progress(run_dir, existing)


def resolve_teacher(config: PipelineConfig, state: PipelineState) -> Path:
    """The checkpoint folder for SRC: a local folder, an ``hf://`` reference, a zoo entry or a new teacher."""
    from dmlkd.checkpoints import resolve_checkpoint_dir
    from dmlkd.engine.distributed import call_on_main

    src = config.src
    from dmlkd.checkpoints.io import is_timm_ref

    if is_timm_ref(src):  # a published timm model, used as is (no head): stage 1 is skipped
        return call_on_main(_save_hub_teacher, src, state.out / "teacher")
    if src.startswith("hf://") or Path(src).expanduser().exists():
        return call_on_main(resolve_checkpoint_dir, src if src.startswith("hf://") else Path(src).expanduser())
    from dmlkd.models.spec import parse_spec

    spec = parse_spec(src)
    from dmlkd.checkpoints.zoo import find_teacher

    entry = find_teacher(config.data.name, str(spec))
    if entry is not None:
        log.info("pretrained teacher for %s on %s from the zoo: %s", spec, config.data.name, entry)
        return call_on_main(resolve_checkpoint_dir, entry.reference)  # one download
    run_dir = state.out / "teacher"
    if not state.done("teacher"):
        from dmlkd.teacher.config import TeacherConfig
        from dmlkd.teacher.trainer import train_teacher

        result = _train_stage(run_dir, "teacher", teacher_config_tree(config), train_teacher, TeacherConfig)
        state.finish("teacher", run_dir=str(run_dir), seconds=round(result.fit.seconds, 1))
    return call_on_main(resolve_checkpoint_dir, run_dir)


def _save_hub_teacher(src: str, folder: Path) -> Path:
    """Write the published timm teacher ``src`` as a checkpoint folder (once; kept when a run resumes)."""
    from dmlkd.checkpoints import read_checkpoint_config, save_checkpoint
    from dmlkd.models.timm_backbone import load_hub_model

    if (folder / "config.json").is_file() and read_checkpoint_config(folder)["provenance"].get("source") == src:
        return folder
    model, record = load_hub_model(src)
    return save_checkpoint(folder, model, provenance=record["provenance"])


def check_teacher(config: PipelineConfig, teacher_dir: Path, state: PipelineState) -> dict[str, Any]:
    """Re-evaluate the teacher (on the main process); stop if it falls far below the metrics recorded with it."""
    from dmlkd.engine.distributed import call_on_main

    if (done := state.done("teacher_check")) is not None:
        return done
    info = call_on_main(_measure_teacher, config, teacher_dir)
    state.finish("teacher_check", **info)
    return info


def _measure_teacher(config: PipelineConfig, teacher_dir: Path) -> dict[str, Any]:
    from dmlkd.checkpoints import load_checkpoint
    from dmlkd.config import EvalConfig
    from dmlkd.data.catalog import build_splits
    from dmlkd.engine.evaluate import evaluate_model, resolve_device

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
    from dmlkd.transfer.config import TransferConfig
    from dmlkd.transfer.trainer import train_transfer

    run_dirs = []
    for method in config.methods:
        run_dir = state.out / "students" / method
        if not state.done(f"student:{method}"):
            result = _train_stage(
                run_dir,
                "transfer",
                student_config_tree(config, teacher_dir, method),
                train_transfer,
                TransferConfig,
            )
            state.finish(
                f"student:{method}",
                run_dir=str(run_dir),
                teacher_mode=result.teacher_mode,
                seconds=round(result.fit.seconds, 1),
            )
        run_dirs.append(run_dir)
    return run_dirs


def export_students(config: PipelineConfig, run_dirs: list[Path], state: PipelineState) -> list[Path]:
    from dmlkd.engine.distributed import call_on_main
    from dmlkd.student.export import export_model

    exported = []
    for method, run_dir in zip(config.methods, run_dirs):
        target = state.out / "exports" / method
        if not state.done(f"export:{method}"):
            call_on_main(export_model, str(run_dir), target, config.export_format, overwrite=True)
            state.finish(f"export:{method}", path=str(target), format=config.export_format)
        exported.append(target)
    return exported


def make_report(config: PipelineConfig, teacher_dir: Path, run_dirs: list[Path], state: PipelineState) -> dict:
    from dmlkd.engine.distributed import call_on_main

    results = call_on_main(_write_report, config, teacher_dir, run_dirs, state)
    state.finish("report", path=str(state.out / "report.md"))
    return results


def _write_report(config: PipelineConfig, teacher_dir: Path, run_dirs: list[Path], state: PipelineState) -> dict:
    from dmlkd.config import EvalConfig
    from dmlkd.data.catalog import build_splits
    from dmlkd.engine.evaluate import resolve_device
    from dmlkd.pipelines.report import ReportEntry, write_report

    teacher_run = teacher_dir.parent if teacher_dir.name in ("best", "last") else teacher_dir
    entries = [ReportEntry("teacher", "teacher", teacher_run)]
    for method, run_dir in zip(config.methods, run_dirs):
        mode = (state.done(f"student:{method}") or {}).get("teacher_mode")
        entries.append(ReportEntry(method, "student", run_dir, method=method, teacher_mode=mode))
    splits, _ = build_splits(config.data)
    student_tree = student_config_tree(config, teacher_dir, config.methods[0])
    eval_config = from_dict(EvalConfig, student_tree.get("eval", {}))
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


def run_pipeline(config: PipelineConfig, out: Path, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) a pipeline into ``out``; returns the report's results (on every process)."""
    from dmlkd.engine.distributed import call_on_main, init_processes, launched

    if launched():
        init_processes(config.device)
    state = call_on_main(PipelineState.open, out, config, overwrite)
    teacher_dir = resolve_teacher(config, state)
    check_teacher(config, teacher_dir, state)
    run_dirs = train_students(config, teacher_dir, state)
    export_students(config, run_dirs, state)
    return make_report(config, teacher_dir, run_dirs, state)


def validate_pipeline(config: PipelineConfig) -> None:
    """Fail before any training on names or overrides that cannot work (one-line errors)."""
    from dmlkd.models.spec import parse_spec
    from dmlkd.registry import DATASETS, TRANSFER_METHODS
    from dmlkd.teacher.config import TeacherConfig
    from dmlkd.transfer.config import TransferConfig

    DATASETS.get(config.data.name)
    parse_spec(config.dst)
    from dmlkd.checkpoints.io import check_model_ref, is_timm_ref

    src_is_spec = not (config.src.startswith("hf://") or Path(config.src).expanduser().exists())
    if is_timm_ref(config.src):
        src_is_spec = False
        check_model_ref(config.src)  # malformed, unknown or weights not reachable: one line, before training
    if src_is_spec:
        parse_spec(config.src)
        from_dict(TeacherConfig, teacher_config_tree(config))
    for method in config.methods:
        TRANSFER_METHODS.get(method)
        from_dict(TransferConfig, student_config_tree(config, Path("teacher"), method))
