"""R@1 and MAP@R on the same embeddings: dmlkd vs pytorch-metric-learning's ``AccuracyCalculator``.

Usage:
    python bench/eval_vs_peers.py [--n 60000] [--dim 512] [--classes 11316] [--repeats 1]
                                  [--cases pml,dmlkd,dmlkd-faiss] [--threads N]

The data is SOP-like: ``--classes`` classes of 2..12 images each (summing to ``--n``; the SOP test split has
60,502 images in 11,316 classes), class centre plus Gaussian noise, L2-normalised, so that PML's default
Euclidean faiss kNN (``IndexFlatL2``) and dmlkd's cosine kNN rank neighbours alike. It is written once to a
temporary ``.npy`` file; every case then runs in a fresh subprocess that loads it, imports its library, records
its RSS, runs the evaluation, and reports the wall time and the growth of its peak RSS (``ru_maxrss``) over
that RSS: the extra memory the evaluation needed (torch and faiss allocations included; the input is not
counted). Cases run interleaved (pml, dmlkd, ..., pml, dmlkd, ...) so a loaded machine affects them alike.

Cases:
    pml          ``AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"),
                 k="max_bin_count")`` with its default ``FaissKNN`` (faiss ``IndexFlatL2``), as users call it.
    dmlkd        ``dmlkd.evaluation.retrieval_metrics(x, y, ks=(1,))`` with the default ``backend="auto"``
                 (the torch kNN), which returns R@1 and MAP@R from one kNN pass.
    dmlkd-faiss  the same with ``backend="faiss"``.
    dmlkd-sop    ``ks=(1, 10, 100, 1000)`` (the SOP Recall@K; PML has no Recall@K > 1), for information.

PML's ``precision_at_1`` equals Recall@1 (one neighbour: hit or miss); its ``mean_average_precision_at_r``
is MAP@R. Both tools must agree to 1e-6; the script prints the largest difference.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CASES = ("pml", "dmlkd", "dmlkd-faiss", "dmlkd-sop")


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def class_sizes(num: int, classes: int, rng: np.random.Generator, low: int = 2, high: int = 12) -> np.ndarray:
    """``classes`` sizes in ``[low, high]`` summing to ``num`` (random extra images spread over the classes)."""
    if not low * classes <= num <= high * classes:
        raise SystemExit(f"--n {num} cannot be split into {classes} classes of {low}..{high} images")
    sizes = np.full(classes, low, dtype=np.int64)
    while (missing := num - int(sizes.sum())) > 0:
        open_classes = np.flatnonzero(sizes < high)
        picks = rng.choice(open_classes, size=min(missing, open_classes.size), replace=False)
        sizes[picks] += 1
    return sizes


def make_data(num: int, dim: int, classes: int, folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write L2-normalised SOP-like embeddings ``(num, dim)`` float32 and labels ``(num,)`` int64."""
    rng = np.random.default_rng(seed)
    sizes = class_sizes(num, classes, rng)
    labels = np.repeat(np.arange(classes), sizes)
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    embeddings = np.empty((num, dim), dtype=np.float32)
    for start in range(0, num, 8192):
        rows = slice(start, start + 8192)
        block = centres[labels[rows]] + 2.5 * rng.standard_normal((len(labels[rows]), dim), dtype=np.float32)
        embeddings[rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    paths = folder / "embeddings.npy", folder / "labels.npy"
    np.save(paths[0], embeddings)
    np.save(paths[1], labels)
    return paths


def run_pml(embeddings, labels) -> dict[str, float]:
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calculator = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count")
    result = calculator.get_accuracy(embeddings, labels)
    return {"r1": float(result["precision_at_1"]), "map_r": float(result["mean_average_precision_at_r"])}


def run_dmlkd(embeddings, labels, backend: str, ks: tuple[int, ...]) -> dict[str, float]:
    from dmlkd.evaluation import retrieval_metrics

    recall, map_r = retrieval_metrics(embeddings, labels, ks=ks, metric="cosine", backend=backend)
    return {"r1": recall[1], "map_r": float(map_r), **{f"r{k}": v for k, v in recall.items() if k != 1}}


def worker(case: str, embeddings_path: str, labels_path: str, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    embeddings = torch.from_numpy(np.load(embeddings_path))
    labels = torch.from_numpy(np.load(labels_path))
    import faiss  # noqa: F401 - both sides may use it; load its code before the RSS baseline

    if case == "pml":
        import pytorch_metric_learning.utils.accuracy_calculator  # noqa: F401
    else:
        import dmlkd.evaluation  # noqa: F401
    rss_before = current_rss_bytes()
    start = time.perf_counter()
    if case == "pml":
        metrics = run_pml(embeddings, labels)
    elif case == "dmlkd-sop":
        metrics = run_dmlkd(embeddings, labels, "auto", (1, 10, 100, 1000))
    else:
        metrics = run_dmlkd(embeddings, labels, "faiss" if case == "dmlkd-faiss" else "auto", (1,))
    seconds = time.perf_counter() - start
    return {"case": case, "seconds": seconds, "extra_peak_mb": (peak_rss_bytes() - rss_before) / 2**20, **metrics}


def run_case(case: str, paths: tuple[Path, Path], threads: int | None) -> dict:
    command = [sys.executable, __file__, "--worker", case, "--data", str(paths[0]), str(paths[1])]
    if threads:
        command += ["--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(results: dict[str, list[dict]]) -> None:
    print("\n| case | runs | median time (s) | median extra peak (MB) | R@1 | MAP@R |")
    print("|---|---:|---:|---:|---:|---:|")
    medians = {}
    for case, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        peak = statistics.median(r["extra_peak_mb"] for r in runs)
        medians[case] = (seconds, peak)
        metrics = f"{100 * runs[0]['r1']:.3f} | {100 * runs[0]['map_r']:.3f}"
        print(f"| {case} | {len(runs)} | {seconds:.2f} | {peak:.0f} | {metrics} |")
    if "pml" not in results:
        return
    reference = results["pml"][0]
    pml_time, pml_peak = medians["pml"]
    for case, runs in results.items():
        if case == "pml":
            continue
        diff = max(max(abs(r["r1"] - reference["r1"]), abs(r["map_r"] - reference["map_r"])) for r in runs)
        paired = [d["seconds"] / p["seconds"] for d, p in zip(runs, results["pml"])]
        print(
            f"{case}/pml: time {medians[case][0] / pml_time:.2f} (median of paired runs "
            f"{statistics.median(paired):.2f}), extra peak memory {medians[case][1] / pml_peak:.2f}; "
            f"max |diff| R@1, MAP@R = {diff:.2e} ({'agree' if diff <= 1e-6 else 'DIFFER'} to 1e-6)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=11316)
    parser.add_argument("--repeats", type=int, default=1, help="fresh-subprocess runs per case")
    parser.add_argument("--cases", default="pml,dmlkd,dmlkd-faiss", help=f"comma-separated from {CASES}")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--data", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, *args.data, args.threads)))
        return
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; valid: {', '.join(CASES)}")
    print(f"N={args.n} dim={args.dim} classes={args.classes} repeats={args.repeats} cpu_count={os.cpu_count()}")
    with tempfile.TemporaryDirectory(prefix="dmlkd-eval-peers-") as folder:
        paths = make_data(args.n, args.dim, args.classes, Path(folder))
        results: dict[str, list[dict]] = {case: [] for case in cases}
        for _ in range(args.repeats):
            for case in cases:
                result = run_case(case, paths, args.threads)
                results[case].append(result)
                print(json.dumps(result), flush=True)
    summarise(results)


if __name__ == "__main__":
    main()
