"""The end-of-pipeline report: ``results.json``, ``report.md`` and three PNG figures in the pipeline folder.

For every entry (the teacher and each student) the report gathers the metrics recorded in its ``last/`` (the
headline: final step, no selection) and ``best/`` checkpoints (``best`` is selected on the **test** split, as in
the papers: optimistic, a secondary column),
re-embeds the test split once with the last checkpoint on this machine (Recall@K curve, retrieval grid, a
consistency check of the recorded numbers), measures the eval-forward throughput, and joins the published
numbers of ``dmlkd.pipelines.paper`` for CUB, Cars and SOP.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from dmlkd.checkpoints.folder import read_checkpoint_config
from dmlkd.checkpoints.io import load_checkpoint
from dmlkd.checkpoints.selection import selection_note
from dmlkd.config.sections import EvalConfig
from dmlkd.data.base import DatasetSplits
from dmlkd.errors import CheckpointError, ConfigError
from dmlkd.evaluation import evaluate_embeddings
from dmlkd.evaluation.run import embed_collection, eval_image_size, eval_resize_ratio
from dmlkd.pipelines.paper import PAPER_CITATION, canonical_method, paper_result
from dmlkd.pipelines.plots import ModelEmbeddings, write_plots
from dmlkd.pipelines.report_text import format_summary as format_summary
from dmlkd.pipelines.report_text import render_markdown
from dmlkd.pipelines.report_text import summary_rows as summary_rows
from dmlkd.version import __version__

log = logging.getLogger(__name__)

CURVE_MAX_K = 32


@dataclass
class ReportEntry:
    """One model of the report.

    ``run_dir`` is a run folder (``run.json``, ``metrics.jsonl``, ``last/``, ``best/``) or a bare checkpoint
    folder (e.g. a downloaded teacher); whatever is missing is reported as unknown.
    """

    name: str
    role: Literal["teacher", "student"]
    run_dir: Path
    method: str | None = None
    teacher_mode: str | None = None


def write_report(
    out_dir: Path,
    scenario: str,
    dataset: str,
    splits: DatasetSplits,
    entries: list[ReportEntry],
    eval_config: EvalConfig,
    device: torch.device,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``results.json``, ``report.md`` and the PNGs into ``out_dir``; return the results dict.

    Args:
        out_dir: the pipeline folder.
        scenario: e.g. ``"self-transfer"``, ``"dim-reduction"``, ``"compress"`` (selects the paper's table).
        dataset: the dataset name used to look up the paper's numbers (``cub``, ``cars``, ``sop``).
        splits: the evaluated dataset; its test split (or query/gallery) is embedded once per model.
        entries: the teacher and the students, in the order they should appear.
        eval_config: metric, K values, image size, batch size, NMI and seed of the evaluation.
        device: where models are embedded and timed.
        progress: show embedding progress bars.
    """

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ks = [int(k) for k in (eval_config.ks or splits.recall_ks)]
    image_size = eval_image_size(eval_config, splits)
    curve_ks = _curve_ks(ks, _candidates(splits))
    results: dict[str, Any] = {
        "scenario": scenario,
        "dataset": dataset,
        "ks": ks,
        "curve_ks": curve_ks,
        "metric": eval_config.metric,
        "image_size": image_size,
        "machine": machine_info(device),
        "entries": [],
        "paper_source": PAPER_CITATION,
    }
    names = [entry.name for entry in entries]
    if len(set(names)) != len(names):
        raise ConfigError(f"report entry names must be unique, got {names}")
    embedded: dict[str, ModelEmbeddings] = {}
    histories: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        record, embedded[entry.name], histories[entry.name] = _entry_results(
            entry, scenario, dataset, splits, eval_config, ks, curve_ks, image_size, device, progress
        )
        results["entries"].append(record)
    results["has_paper"] = any(record["paper"] for record in results["entries"])
    results["plots"] = write_plots(out_dir, results, splits, embedded, histories, eval_config)
    (out_dir / "report.md").write_text(render_markdown(results))
    (out_dir / "results.json").write_text(json.dumps(_json_safe(results), indent=2) + "\n")
    return results


def _entry_results(
    entry: ReportEntry,
    scenario: str,
    dataset: str,
    splits: DatasetSplits,
    eval_config: EvalConfig,
    ks: list[int],
    curve_ks: list[int],
    image_size: int,
    device: torch.device,
    progress: bool,
) -> tuple[dict[str, Any], ModelEmbeddings, list[dict[str, Any]]]:

    run_dir = Path(entry.run_dir)
    folders = checkpoint_folders(run_dir)
    evaluated = folders["last"] or folders["checkpoint"] or folders["best"]
    if evaluated is None:
        raise CheckpointError(
            f"report entry {entry.name!r}: {str(run_dir)!r} holds no checkpoint "
            "(expected config.json, or last/ or best/ with one)"
        )
    model, checkpoint = load_checkpoint(evaluated, device=device)
    last, best = _recorded_metrics(folders, checkpoint)
    run_home = run_folder(run_dir)
    run = _read_json(run_home / "run.json") if run_home else None
    history = read_history(run_home / "metrics.jsonl") if run_home else []
    embedding = _embed(model, splits, eval_config, image_size, device, progress)
    here = evaluate_embeddings(
        embedding.query,
        embedding.query_labels,
        ks=sorted(set(ks) | set(curve_ks)),
        metric=eval_config.metric,
        gallery=embedding.gallery,
        gallery_labels=embedding.gallery_labels,
        compute_nmi=eval_config.nmi,
        seed=eval_config.seed,
        backend=eval_config.backend,
    )
    method = entry.method or _method_of(checkpoint.get("train_config", {}), entry.role)
    teacher_mode = entry.teacher_mode
    if entry.role == "student" and teacher_mode is None:
        teacher_mode = (run or {}).get("teacher_mode") or checkpoint.get("provenance", {}).get("teacher_mode")
    paper = paper_result(scenario, dataset, method, entry.role)
    record = {
        "name": entry.name,
        "role": entry.role,
        "method": method,
        "teacher_mode": teacher_mode,
        "run_dir": str(run_dir),
        "evaluated_checkpoint": str(evaluated),
        "evaluated_note": selection_note(evaluated, checkpoint),
        "model": _model_summary(checkpoint),
        "embedding_dim": int(getattr(model, "embedding_dim", embedding.query.shape[1])),
        "parameters": count_parameters(model),
        "last": last,
        "best": best,
        "here": {k: v for k, v in here.items() if not k.startswith("recall@") or int(k[7:]) in ks},
        "recall_curve": {str(k): here[f"recall@{k}"] for k in curve_ks},
        "throughput": {
            "images_per_second": measure_throughput(model, image_size, device),
            "batch_size": 64,
            "image_size": image_size,
            "device": str(device),
        },
        "train_seconds": (run or {}).get("train_seconds"),
        "status": (run or {}).get("status"),
        "epochs_evaluated": len(history),
        "paper": {**paper.as_dict(), "row": canonical_method(method, entry.role)} if paper else None,
    }
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record, embedding, history


def checkpoint_folders(run_dir: Path) -> dict[str, Path | None]:
    """``{"last", "best", "checkpoint"}``: the run's checkpoint folders, and ``run_dir`` if it is one."""

    def found(path: Path) -> Path | None:
        return path if (path / "config.json").is_file() else None

    return {"last": found(run_dir / "last"), "best": found(run_dir / "best"), "checkpoint": found(run_dir)}


def run_folder(run_dir: Path) -> Path | None:
    """The folder with ``run.json``/``metrics.jsonl``: ``run_dir``, or the run a checkpoint folder sits in."""
    is_checkpoint = (run_dir / "config.json").is_file()
    for folder in (run_dir, run_dir.parent) if is_checkpoint else (run_dir,):
        if (folder / "run.json").is_file() or (folder / "metrics.jsonl").is_file():
            return folder
    return None


def read_history(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (empty when absent; unreadable lines are skipped with a warning)."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s line %d is not JSON; skipped", path, number)
    return rows


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        log.warning("%s is not JSON; ignored", path)
        return None


def _recorded_metrics(
    folders: dict[str, Path | None], checkpoint: dict[str, Any]
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The metrics stored in ``last/`` and ``best/``; a bare checkpoint counts as what it was saved as."""

    def metrics_of(folder: Path | None) -> dict[str, Any] | None:
        return read_checkpoint_config(folder).get("metrics") or None if folder else None

    last, best = metrics_of(folders["last"]), metrics_of(folders["best"])
    if folders["checkpoint"] is not None and checkpoint.get("metrics"):
        if checkpoint["metrics"].get("selected") == "best":
            best = checkpoint["metrics"]
        else:
            last = checkpoint["metrics"]
    last = {k: v for k, v in last.items() if k != "selected"} if last else None
    best = {**{k: v for k, v in best.items() if k != "selected"}, "selected_on": "test"} if best else None
    return last, best


def _method_of(train_config: dict[str, Any], role: str) -> str | None:
    section = train_config.get("loss" if role == "teacher" else "method")
    return section.get("name") if isinstance(section, dict) else None


def _model_summary(checkpoint: dict[str, Any]) -> dict[str, Any]:
    spec = checkpoint.get("model", {})
    arch, dim = spec.get("arch"), spec.get("embedding_dim")
    return {"arch": arch, "spec": f"{arch}-{dim}" if arch and dim else None, "l2_norm": spec.get("l2_norm")}


def count_parameters(model: nn.Module) -> int:
    """All parameters of the embedding network (backbone + head), trainable or not."""
    return int(sum(p.numel() for p in model.parameters()))


@torch.no_grad()
def measure_throughput(
    model: nn.Module,
    image_size: int,
    device: torch.device,
    batch_size: int = 64,
    warmup: int = 2,
    repeats: int = 5,
) -> float:
    """Images per second of the eval forward on random ``(batch_size, 3, S, S)`` inputs: the median of
    ``repeats`` timed batches after ``warmup`` untimed ones (CUDA is synchronised around each batch)."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    images = torch.rand(batch_size, 3, image_size, image_size, device=device)
    seconds = []
    try:
        for index in range(warmup + repeats):
            _synchronize(device)
            started = time.perf_counter()
            model(images)
            _synchronize(device)
            if index >= warmup:
                seconds.append(time.perf_counter() - started)
    finally:
        for module, training in modes.items():
            module.training = training
    return batch_size / max(statistics.median(seconds), 1e-9)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: torch.device) -> dict[str, Any]:

    info = {
        "torch": torch.__version__,
        "dmlkd": __version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def _embed(
    model: nn.Module,
    splits: DatasetSplits,
    eval_config: EvalConfig,
    image_size: int,
    device: torch.device,
    progress: bool,
) -> ModelEmbeddings:

    resize_ratio = eval_resize_ratio(eval_config, splits)
    if splits.query is not None and splits.gallery is not None:
        query = embed_collection(model, splits.query, eval_config, image_size, resize_ratio, device, progress)
        gallery = embed_collection(model, splits.gallery, eval_config, image_size, resize_ratio, device, progress)
        return ModelEmbeddings(*query, *gallery)
    return ModelEmbeddings(
        *embed_collection(model, splits.test, eval_config, image_size, resize_ratio, device, progress)
    )


def _candidates(splits: DatasetSplits) -> int:
    if splits.query is not None and splits.gallery is not None:
        return len(splits.gallery)
    return len(splits.test) - 1


def _curve_ks(ks: list[int], candidates: int) -> list[int]:
    """K = 1..32 plus the dataset's K values, capped at the number of candidates per query."""
    return sorted(k for k in set(range(1, CURVE_MAX_K + 1)) | set(ks) if k <= max(candidates, 1))


def _json_safe(value: Any) -> Any:
    """NaN/inf → None (strict JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
