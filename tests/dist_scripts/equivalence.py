"""Tiny trainings and an evaluation whose results tests/test_distributed.py compares across process counts.

Run it as one plain process (the reference) or under ``torchrun`` / ``accelerate launch`` (N processes);
the global batch is the same either way. For every case it writes, per process ``r``, to ``OUT/<case>/``:

- ``rank<r>.state.safetensors``: the trained module's state (network + loss parameters and buffers) after
  the real ``fit`` (3 optimiser steps), taken from every process to check they stay in sync;
- ``rank<r>.rows.safetensors``: what the loss saw at each step (gathered rows: dataset indices, labels,
  student/teacher embeddings) and ``rank<r>.terms.json`` the loss values;
- ``run/``: the run folder (checkpoints and ``metrics.jsonl``, written by the main process).

The ``eval`` case evaluates the teacher checkpoint with distributed evaluation at two eval batch sizes and
writes the metrics and the gathered embeddings of every process.

Usage: equivalence.py OUT TEACHER_CHECKPOINT [--cases teacher,cached,online,crd,eval]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import dmlkd.teacher.trainer as teacher_trainer
import dmlkd.transfer.trainer as transfer_trainer
from dmlkd.config import from_dict
from dmlkd.engine.distributed import init_processes, rank
from dmlkd.teacher.config import TeacherConfig
from dmlkd.teacher.losses.proxy_anchor import ProxyAnchorLoss
from dmlkd.transfer.config import TransferConfig
from dmlkd.transfer.methods.crd import CRD
from dmlkd.transfer.methods.relaxed_contrastive import RelaxedContrastive

DATA = {"name": "glyphs", "options": {"max_classes": 16}}
# SGD: with Adam the first steps are ~lr * sign(grad), which turns last-bit differences of the gradient
# sums (gloo vs one process) into lr-sized ones for gradients near zero.
OPTIM = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "scheduler": "none", "bn_freeze": True}
TRAIN = {
    "epochs": 1,
    "max_steps": 3,
    "batch_size": 16,
    "ipc": 4,
    "views": 2,
    "seed": 5,
    "device": "cpu",
    "progress": False,
}
# Two views that replay the same cached set are identical images: their zero distance makes the relaxed
# loss's gradient direction ill-conditioned (any last-bit difference flips it). One view, and a sampler
# without repeated images, keep the cached comparison well-conditioned.
CACHED_TRAIN = {**TRAIN, "views": 1, "sampler_mode": "cover"}
EVAL = {"nmi": False, "batch_size": 100}

ROWS: list[dict[str, torch.Tensor]] = []
STATES: list[dict[str, torch.Tensor]] = []


def _record(**tensors: torch.Tensor) -> None:
    ROWS.append({name: value.detach().cpu().clone() for name, value in tensors.items()})


def _install_recorders() -> None:
    """Wrap the losses' forward so each step's gathered rows are kept, and fit to keep the final state."""
    proxy_anchor = ProxyAnchorLoss.forward

    def record_proxy_anchor(self: Any, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = proxy_anchor(self, embeddings, labels)
        _record(embedding=embeddings, labels=labels, loss=loss)
        return loss

    ProxyAnchorLoss.forward = record_proxy_anchor  # type: ignore[method-assign]
    for cls in (RelaxedContrastive, CRD):
        original = cls.forward

        def record_method(self: Any, student: Any, teacher: Any, batch: Any, _original: Any = original) -> Any:
            terms = _original(self, student, teacher, batch)
            _record(
                student=student.embedding,
                teacher=teacher.embedding,
                indices=batch.indices,
                labels=batch.labels,
                loss=sum(terms.values()),
            )
            return terms

        cls.forward = record_method  # type: ignore[method-assign]
    for module in (teacher_trainer, transfer_trainer):
        real_fit = module.fit

        def fit_and_keep(stage: Any, *args: Any, _fit: Any = real_fit, **kwargs: Any) -> Any:
            result = _fit(stage, *args, **kwargs)
            STATES.append({k: v.detach().cpu().contiguous().clone() for k, v in stage.module.state_dict().items()})
            return result

        module.fit = fit_and_keep  # type: ignore[attr-defined]


def _dump(folder: Path) -> None:
    tensors = {f"step{step}.{name}": value for step, row in enumerate(ROWS) for name, value in row.items()}
    save_file(tensors, str(folder / f"rank{rank()}.rows.safetensors"))
    save_file(STATES[-1], str(folder / f"rank{rank()}.state.safetensors"))
    ROWS.clear()


def _teacher(out: Path) -> None:
    tree = {
        "model": {"arch": "resnet18", "embedding_dim": 8, "pretrained": False, "l2_norm": True},
        "loss": {"name": "proxy_anchor"},
        "data": DATA,
        "optim": OPTIM,
        "train": TRAIN,
        "eval": EVAL,
    }
    config = from_dict(TeacherConfig, tree)
    run_dir = out / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    teacher_trainer.train_teacher(config, run_dir)
    _dump(out)


def _transfer(out: Path, teacher: str, mode: str, method: dict[str, Any], train: dict[str, Any]) -> None:
    tree = {
        "teacher": {"ref": teacher, "mode": mode, "cache_views": 2, "cache_dir": str(out / "cache")},
        "student": {"arch": "resnet18", "embedding_dim": 8, "pretrained": False},
        "method": method,
        "data": DATA,
        "optim": {**OPTIM, "lr": 1e-4},  # the raw student embedding diverges at higher rates
        "train": train,
        "eval": EVAL,
    }
    config = from_dict(TransferConfig, tree)
    run_dir = out / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    transfer_trainer.train_transfer(config, run_dir)
    _dump(out)


def _evaluate(out: Path, teacher: str) -> None:
    from dmlkd.checkpoints.io import load_checkpoint
    from dmlkd.config import DataConfig, EvalConfig
    from dmlkd.data.catalog import build_splits
    from dmlkd.evaluation.run import embed_collection, evaluate_model

    model, _ = load_checkpoint(teacher)
    splits, _ = build_splits(DataConfig(**DATA))
    device = torch.device("cpu")
    results, tensors = {}, {}
    for batch_size in (48, 256):  # 6 uneven shards; one batch only (the second process embeds nothing)
        config = EvalConfig(nmi=True, batch_size=batch_size, second_metric="euclidean")
        results[batch_size] = evaluate_model(model, splits, config, device, progress=False, distributed=True)
        embeddings, labels = embed_collection(model, splits.test, config, 32, 1.0, device, False, True)
        tensors[f"embeddings.{batch_size}"], tensors[f"labels.{batch_size}"] = embeddings, labels
    (out / f"rank{rank()}.metrics.json").write_text(json.dumps(results, sort_keys=True))
    save_file(tensors, str(out / f"rank{rank()}.embeddings.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("teacher")
    parser.add_argument("--cases", default="teacher,cached,online,crd,eval")
    args = parser.parse_args()
    init_processes("cpu")
    _install_recorders()
    out, teacher = Path(args.out), args.teacher
    cases = args.cases.split(",")
    for case in cases:
        folder = out / case
        folder.mkdir(parents=True, exist_ok=True)
        if case == "teacher":
            _teacher(folder)
        elif case == "cached":
            _transfer(folder, teacher, "cached", {"name": "relaxed_contrastive"}, CACHED_TRAIN)
        elif case == "online":
            _transfer(folder, teacher, "online", {"name": "relaxed_contrastive"}, TRAIN)
        elif case == "crd":
            _transfer(folder, teacher, "online", {"name": "crd", "kwargs": {"nce_k": 64}}, TRAIN)
        elif case == "eval":
            _evaluate(folder, teacher)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
