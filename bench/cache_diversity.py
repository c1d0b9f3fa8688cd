"""Does the teacher cache's limited view diversity cost accuracy? Online vs cached K in {2, 8, 32} vs refresh.

Usage:
    python bench/cache_diversity.py [--work DIR] [--seeds 0,1,2] [--epochs 20] [--max-classes 40]
                                    [--variants online,k2,k8,k32,k8r5] [--teacher RUN] [--student resnet18-32]
                                    [--image-size 32] [--parallel 1]

One teacher (trained here once with ``dmlkd teacher train`` on the glyph demo data, or ``--teacher``) and, for
every seed, the same student recipe trained with each teacher variant:

- ``online``: the teacher runs on every step on the student's augmented views (the reference);
- ``kK``: an exact-replay cache with ``K`` views per image (``--teacher-mode cached --cache-views K``);
- ``kKrE``: the same cache re-drawn every ``E`` epochs (``--cache-refresh-epochs E``): ``K`` new views per
  image every ``E`` epochs, at ``N*K`` teacher passes per refresh.

Each run is a fresh ``dmlkd transfer train`` process (relaxed contrastive, the demo transfer recipe with the
epochs, classes and image size given here; ``--parallel`` runs at a time, so the wall times of runs that ran
together compare side by side); the cache folder is per run so that every
cached variant pays for its build.
Prints, per variant, test Recall@1 mean ± std over seeds (the run's final evaluation), the difference to
online, and the median wall time of a run (build included), and writes ``results.json`` to ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _dmlkd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dmlkd", *args]


def _glyph_args(args: argparse.Namespace) -> list[str]:
    return [
        *("--dataset", "glyphs", "--set", f"data.options.max_classes={args.max_classes}", "--no-progress"),
        *("--image-size", str(args.image_size), "--set", "train.save_every=1000000"),  # no mid-run states
    ]


def train_teacher(work: Path, args: argparse.Namespace) -> Path:
    out = work / "teacher"
    if (out / "last" / "config.json").is_file():
        return out
    command = _dmlkd(
        "teacher",
        "train",
        "--out",
        str(out),
        "--model",
        args.teacher_model,
        "--epochs",
        str(args.teacher_epochs),
        "--batch-size",
        str(args.batch_size),
        "--ipc",
        "4",
        *_glyph_args(args),
        "--set",
        "eval.nmi=false",
    )
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return out


def variant_args(name: str) -> list[str]:
    if name == "online":
        return ["--teacher-mode", "online"]
    views, _, refresh = name[1:].partition("r")
    extra = ["--teacher-mode", "cached", "--cache-views", views]
    return extra + (["--cache-refresh-epochs", refresh] if refresh else [])


def recall_at_1(run: Path) -> float:
    record = json.loads((run / "last" / "config.json").read_text())
    metrics = record["metrics"]
    key = next(k for k in ("recall@1", "R@1", "r@1") if k in metrics)
    return 100.0 * float(metrics[key]) if float(metrics[key]) <= 1.0 else float(metrics[key])


def run_student(work: Path, teacher: Path, name: str, seed: int, args: argparse.Namespace) -> tuple[float, float]:
    out = work / f"{name}-seed{seed}"
    if (out / "last" / "config.json").is_file() and (out / "wall.txt").is_file():
        return recall_at_1(out), float((out / "wall.txt").read_text())
    command = _dmlkd(
        "transfer",
        "train",
        "--teacher",
        str(teacher),
        "--out",
        str(out),
        "--student",
        args.student,
        "--epochs",
        str(args.epochs),
        "--seed",
        str(seed),
        "--batch-size",
        str(args.batch_size),
        "--ipc",
        "4",
        *_glyph_args(args),
        "--set",
        f"teacher.cache_dir={out}-cache",
        "--set",
        "eval.nmi=false",
        "--set",
        f"train.eval_every={args.epochs}",
        "--overwrite",
        *variant_args(name),
    )
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    (out / "wall.txt").write_text(f"{wall:.2f}")
    return recall_at_1(out), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench-cache-diversity"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--max-classes", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--variants", default="online,k2,k8,k32,k8r5")
    parser.add_argument("--teacher", type=Path, default=None)
    parser.add_argument("--teacher-model", default="resnet18-32")
    parser.add_argument("--teacher-epochs", type=int, default=12)
    parser.add_argument("--student", default="resnet18-32")
    parser.add_argument("--image-size", type=int, default=32, help="Training (and teacher) input size.")
    parser.add_argument("--parallel", type=int, default=1, help="Runs trained at the same time (one process each).")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    variants = args.variants.split(",")
    began = time.perf_counter()
    teacher = args.teacher or train_teacher(args.work, args)
    teacher_r1 = recall_at_1(teacher) if (teacher / "last" / "config.json").is_file() else float("nan")
    results: dict[str, dict[str, list[float]]] = {name: {"r1": [], "wall": []} for name in variants}

    pairs = [(seed, name) for seed in seeds for name in variants]  # finished runs are read back, not rerun

    def one_run(pair: tuple[int, str]) -> tuple[str, float, float]:
        seed, name = pair
        r1, wall = run_student(args.work, teacher, name, seed, args)
        print(f"seed {seed} {name:8s} R@1 {r1:6.2f}  {wall:6.1f} s", flush=True)
        return name, r1, wall

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        for name, r1, wall in pool.map(one_run, pairs):
            results[name]["r1"].append(r1)
            results[name]["wall"].append(wall)
    online = statistics.mean(results["online"]["r1"]) if "online" in results else float("nan")
    print(f"\nteacher R@1 {teacher_r1:.2f}; {len(seeds)} seeds, {args.epochs} epochs, {args.max_classes} classes")
    print(f"{'variant':8s} {'R@1 mean':>9s} {'std':>6s} {'vs online':>9s} {'median wall s':>13s}")
    for name, values in results.items():
        mean = statistics.mean(values["r1"])
        std = statistics.stdev(values["r1"]) if len(values["r1"]) > 1 else 0.0
        wall = statistics.median(values["wall"])
        print(f"{name:8s} {mean:9.2f} {std:6.2f} {mean - online:+9.2f} {wall:13.1f}")
    summary = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "teacher_r1": teacher_r1,
        "results": results,
        "total_seconds": time.perf_counter() - began,
    }
    (args.work / "results.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
