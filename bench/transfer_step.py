"""Median time of one transfer optimiser step: student alone vs cached teacher vs online teacher.

Usage:
    python bench/transfer_step.py [--teacher PATH] [--image-size 32,64] [--steps 20] [--warmup 3]
                                  [--batch-size 90] [--ipc 2] [--cache-views 8] [--threads N]

Without ``--teacher`` a random-init resnet50-512 teacher checkpoint is written to ``--work`` (the timing does
not depend on the weights). For each image size, on the glyph demo data, the same pre-collated batches
(``batch-size`` images x 2 views, 180 rows for the reference 45 x 2 x 2) go through three steps, measured
interleaved (a, b, c, a, b, c, ...) so that a noisy machine affects all three alike:

a. floor: the resnet18-128 student's forward + backward + optimiser step, no teacher (a sum-of-squares loss);
b. cached: ``TransferModule`` with a cached ``TeacherSource`` (exact-replay lookup) + relaxed contrastive;
c. online: ``TransferModule`` with an online ``TeacherSource`` (teacher forward under no_grad) + relaxed
   contrastive.

b and c use the trainer's own code path (``build_teacher_source``, ``build_method``, ``param_groups``,
``build_optimizer``); the cache is built (once, kept in ``--work``) by ``load_or_build_cache``. Data loading
is not timed, as in the training loop's per-step time. Prints the medians and the ratios cached/floor and
online/cached, both as a ratio of medians and as the median of per-iteration ratios (steps of one iteration
run back to back, so the paired ratio is the more robust one on a loaded machine).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

import torch

from dmlkd.config import apply_overrides, from_dict
from dmlkd.transfer.config import TransferConfig, start_tree


def make_random_teacher(folder: Path) -> Path:
    """A random-init resnet50-512 checkpoint in ``folder`` (kept between runs)."""
    from dmlkd.checkpoints.folder import save_checkpoint
    from dmlkd.models import create_model

    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        save_checkpoint(folder, create_model("resnet50-512"), provenance={"note": "random init, benchmark"})
    return folder


def bench_config(args: argparse.Namespace, teacher: Path, image_size: int) -> TransferConfig:
    items = [
        f"teacher.ref={teacher}",
        f"teacher.cache_dir={args.work / 'cache'}",
        f"teacher.cache_views={args.cache_views}",
        "student.arch=resnet18",
        "student.embedding_dim=128",
        f"train.batch_size={args.batch_size}",
        f"train.ipc={args.ipc}",
        "train.views=2",
        f"train.image_size={image_size}",
        "train.progress=false",
        "train.device=cpu",
    ]
    return from_dict(TransferConfig, apply_overrides(start_tree("demo-glyphs", "glyphs"), items))


def collect_batches(config: TransferConfig, splits, count: int) -> list:
    """``count`` (Batch, replay_k) pairs from the real training loader (replaying the cache's views)."""
    from dmlkd.data.training import build_train_data
    from dmlkd.data.transforms import ReplaySpec

    replay = ReplaySpec(config.teacher.cache_views, config.train.seed)
    data = build_train_data(splits, config.train, replay=replay)
    batches: list = []
    epoch = 0
    while len(batches) < count:
        for batch in data.loader_factory(epoch, 0):
            batches.append(batch)
            if len(batches) == count:
                break
        epoch += 1
    return batches


class Step:
    """One optimiser step of a module returning ``{"loss": ...}``, as the training loop does it (fp32)."""

    def __init__(self, name: str, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.name, self.module, self.optimizer = name, module.train(), optimizer
        self.seconds: list[float] = []

    def __call__(self, batch, replay_k: torch.Tensor, record: bool) -> None:
        started = time.perf_counter()
        loss = self.module(batch, replay_k)["loss"]
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if record:
            self.seconds.append(time.perf_counter() - started)


class StudentOnly(torch.nn.Module):
    """The floor: the student's forward and backward with a negligible loss, no teacher."""

    def __init__(self, student: torch.nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, batch, replay_k: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": self.student(batch.images).embedding.float().pow(2).mean()}


def build_steps(config: TransferConfig, splits) -> list[Step]:
    from dmlkd.engine.optim import build_optimizer
    from dmlkd.models import build_model
    from dmlkd.registry import TRANSFER_METHODS
    from dmlkd.transfer.teacher_source import build_teacher_source, load_teacher
    from dmlkd.transfer.trainer import TransferModule, build_method, param_groups

    torch.manual_seed(0)
    teacher, _record, digest = load_teacher(config.teacher.ref)
    student = build_model(config.student)
    method_cls = TRANSFER_METHODS.get(config.method.name)
    num_classes = len(set(int(label) for label in splits.train.labels))
    device = torch.device("cpu")
    steps = []
    floor_student = copy.deepcopy(student)
    floor_groups = [
        ("backbone", list(floor_student.backbone.parameters()), 1.0),
        ("head", list(floor_student.embedding.parameters()), 1.0),
    ]
    steps.append(Step("floor", StudentOnly(floor_student), build_optimizer(floor_groups, config.optim)))
    for mode in ("cached", "online"):
        copy_ = copy.deepcopy(student)
        method = build_method(config, copy_, teacher, splits, num_classes)
        source = build_teacher_source(config, teacher, digest, splits, method_cls, mode, device)
        module = TransferModule(copy_, method, source)
        steps.append(Step(mode, module, build_optimizer(param_groups(module, config), config.optim)))
    return steps


def measure(args: argparse.Namespace, teacher: Path, image_size: int) -> dict[str, float]:
    from dmlkd.data.catalog import build_splits

    config = bench_config(args, teacher, image_size)
    splits, _bad = build_splits(config.data)
    steps = build_steps(config, splits)  # builds the cache first if needed (not timed)
    batches = collect_batches(config, splits, args.warmup + args.steps)
    rows = len(batches[0][0].images)
    for index, (batch, replay_k) in enumerate(batches):
        for step in steps:  # interleaved: floor, cached, online, floor, ...
            step(batch, replay_k, record=index >= args.warmup)
    medians = {step.name: statistics.median(step.seconds) for step in steps}
    print(
        f"image size {image_size}: {rows} rows per step ({args.batch_size} images x 2 views), "
        f"median of {args.steps} steps after {args.warmup} warm-up"
    )
    for step in steps:
        spread = f"{min(step.seconds) * 1e3:.0f}-{max(step.seconds) * 1e3:.0f}"
        print(f"  {step.name:<7} {medians[step.name] * 1e3:8.0f} ms  (range {spread} ms)")
    times = {step.name: step.seconds for step in steps}
    for top, bottom, target in (("cached", "floor", "<= 1.10"), ("online", "cached", ">= 1.5")):
        paired = statistics.median(a / b for a, b in zip(times[top], times[bottom]))
        print(
            f"  {top} / {bottom}: {medians[top] / medians[bottom]:.3f} (ratio of medians), "
            f"{paired:.3f} (median of per-iteration ratios)  target {target}"
        )
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=None, help="teacher (default: random r50-512)")
    parser.add_argument("--image-size", default="32", help="comma-separated, e.g. 32,64")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=90, help="distinct images per step (before views)")
    parser.add_argument("--ipc", type=int, default=2)
    parser.add_argument("--cache-views", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/dmlkd-bench-transfer"),
        help="folder for the random teacher and the cache",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    teacher = args.teacher or make_random_teacher(args.work / "teacher-r50-512")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
        f"teacher {teacher}; cache views {args.cache_views}"
    )
    for size in (int(value) for value in args.image_size.split(",")):
        measure(args, teacher, size)


if __name__ == "__main__":
    main()
