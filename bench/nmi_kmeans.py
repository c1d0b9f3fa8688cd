"""Time and seed variance of the NMI metric's k-means at SOP-like k, for several k-means settings.

Usage:
    python bench/nmi_kmeans.py [--case loo-20k] [--scale 1.0] [--seeds 5]
                               [--variants k-means++:100:0,random:100:0,random:100:0.001] [--threads 2]

A variant is ``init:niter:tol`` (see ``dmlkd.evaluation.kmeans``): ``k-means++:100:0`` is the previous
default (k-means++ seeding, Lloyd until no assignment changes, at most 100 iterations). Each variant runs with
seeds ``0 .. S-1`` on the same SOP-like embeddings (``bench/eval_floor.py``'s generator, L2-normalised as
``evaluate_embeddings`` does for cosine) with k = number of classes. The script prints, per variant, the NMI
mean and standard deviation over the seeds, the median time and the Lloyd iterations. The NMI of one variant
"does not change the value beyond seed variance" of another when the difference of the means is within about
the seeds' standard deviation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_floor import CASES, make_case

from dmlkd.evaluation import kmeans, normalized_mutual_info
from dmlkd.evaluation.knn import prepare


def run_variant(points: torch.Tensor, labels: torch.Tensor, variant: str, seeds: int) -> dict:
    init, niter, tol = variant.split(":")
    classes = int(torch.unique(labels).numel())
    scores, times, iterations = [], [], []
    for seed in range(seeds):
        info: dict = {}
        start = time.perf_counter()
        clusters = kmeans(points, classes, seed=seed, niter=int(niter), init=init, tol=float(tol), info=info)
        times.append(time.perf_counter() - start)
        scores.append(normalized_mutual_info(labels, clusters))
        iterations.append(info["iterations"])
    return {
        "variant": variant,
        "nmi_mean": statistics.mean(scores),
        "nmi_std": statistics.stdev(scores) if seeds > 1 else 0.0,
        "nmi": scores,
        "seconds": statistics.median(times),
        "iterations": iterations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="loo-20k", choices=sorted(CASES))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the case's sizes (quick runs)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--noise", type=float, default=2.5)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--variants", default="k-means++:100:0,random:100:0,random:100:0.001")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    case = make_case(args.case, args.dim, args.noise, args.scale)
    points = prepare(case["queries"], "cosine")
    labels = case["labels"]
    print(
        f"{args.case} x{args.scale}: {points.shape[0]} x {points.shape[1]}, k = {int(torch.unique(labels).numel())}"
        f", {args.seeds} seeds, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    )
    for variant in args.variants.split(","):
        result = run_variant(points, labels, variant, args.seeds)
        print(
            f"{variant:<22} NMI {100 * result['nmi_mean']:.3f} ± {100 * result['nmi_std']:.3f}"
            f"  median {result['seconds']:8.1f} s  iterations {result['iterations']}"
            f"  values {[round(100 * v, 3) for v in result['nmi']]}",
            flush=True,
        )


if __name__ == "__main__":
    main()
