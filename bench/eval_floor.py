"""Exact Recall@{1,10,100,1000} + MAP@R against the bare chunked matrix product of the same embeddings.

Usage:
    python bench/eval_floor.py [--cases loo-20k,inshop,loo-60k] [--metrics cosine,euclidean] [--repeats 3]
                               [--topk] [--threads 2] [--noise 2.5] [--scale 1.0]

The exact metrics cannot cost less than the ``N × G`` similarity product. For each case this prints, from one
process and interleaved repeats (medians):

- ``product``: the bare chunked product, ``queries[chunk] @ gallery.T`` into one reused buffer, with the same
  chunk size as the metric pass (the floor);
- ``metrics``: ``dmlkd.evaluation.retrieval_metrics(ks=(1, 10, 100, 1000), with_map=True)``, the counting
  path of ``dmlkd.evaluation.ranks`` (input checks and L2 normalisation included);
- ``top-k`` (with ``--topk``): the previous path, an exact top-1000 kNN search per chunk, for comparison; its
  values are checked to be identical to the counting path's.

Cases (class sizes 2..12 like SOP, class centre plus Gaussian noise of ``--noise`` times the centre scale):

- ``loo-20k``: 20,000 × 512 in 4,000 classes, leave-one-out;
- ``loo-60k``: 60,000 × 512 in 11,316 classes (the SOP test size), leave-one-out;
- ``inshop``: In-shop-like query → gallery, 14,218 queries and 12,612 gallery items in 3,985 classes.

``--scale`` multiplies every size (and class count) for quick runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from dmlkd.evaluation import retrieval_metrics
from dmlkd.evaluation.knn import prepare, score_chunks
from dmlkd.evaluation.metrics import _topk_retrieval_stats, count_positives
from dmlkd.evaluation.ranks import search_depth

KS = (1, 10, 100, 1000)
CASES = {
    "loo-20k": {"queries": 20_000, "gallery": 0, "classes": 4_000},
    "loo-60k": {"queries": 60_000, "gallery": 0, "classes": 11_316},
    "inshop": {"queries": 14_218, "gallery": 12_612, "classes": 3_985},
}


def labelled_points(num: int, classes: int, centres: torch.Tensor, noise: float, generator) -> tuple:
    """``num`` points, every class at least twice when possible, class centre plus noise; shuffled."""
    base = torch.arange(classes).repeat(2)[:num]
    extra = torch.randint(classes, (num - base.numel(),), generator=generator)
    labels = torch.cat([base, extra])[torch.randperm(num, generator=generator)]
    points = centres[labels] + noise * torch.randn(num, centres.shape[1], generator=generator)
    return points, labels


def make_case(name: str, dim: int, noise: float, scale: float, seed: int = 0) -> dict:
    spec = {key: round(value * scale) for key, value in CASES[name].items()}
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(spec["classes"], dim, generator=generator)
    queries, query_labels = labelled_points(spec["queries"], spec["classes"], centres, noise, generator)
    case = {"name": name, "queries": queries, "labels": query_labels, "gallery": None, "gallery_labels": None}
    if spec["gallery"]:
        case["gallery"], case["gallery_labels"] = labelled_points(
            spec["gallery"], spec["classes"], centres, noise, generator
        )
    return case


def metric_chunk_rows(case: dict, metric: str) -> int:
    """The chunk size the counting path uses for this case (default budget)."""
    gallery_labels = case["labels"] if case["gallery"] is None else case["gallery_labels"]
    positives = count_positives(case["labels"], gallery_labels, case["gallery"] is None)
    available = gallery_labels.shape[0] - int(case["gallery"] is None)
    depth = search_depth(list(KS), int(positives.max()), True, available)
    return max(1, (1 << 30) // (gallery_labels.shape[0] * 24 + 48 * depth))


class Clock:
    """Wall time and this process's CPU time (all threads); CPU time is the steadier figure on a shared host."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def time_product(case: dict, metric: str) -> tuple[float, float]:
    rows = metric_chunk_rows(case, metric)
    clock = Clock()
    queries = prepare(case["queries"], metric)
    gallery = None if case["gallery"] is None else prepare(case["gallery"], metric)
    for _ in score_chunks(queries, gallery, "cosine", rows):  # "cosine": the product alone, no distance terms
        pass
    return clock.stop()


def time_metrics(case: dict, metric: str) -> tuple[tuple[float, float], dict]:
    clock = Clock()
    recall, map_r = retrieval_metrics(
        case["queries"], case["labels"], KS, metric, case["gallery"], case["gallery_labels"], True
    )
    return clock.stop(), {**{f"R@{k}": v for k, v in recall.items()}, "MAP@R": map_r}


def time_topk(case: dict, metric: str) -> tuple[tuple[float, float], dict]:
    clock = Clock()
    gallery_labels = case["labels"] if case["gallery"] is None else case["gallery_labels"]
    leave_one_out = case["gallery"] is None
    positives = count_positives(case["labels"], gallery_labels, leave_one_out)
    first_hit, ap = _topk_retrieval_stats(
        case["queries"],
        case["labels"],
        case["gallery"],
        gallery_labels,
        positives,
        list(KS),
        True,
        metric,
        "torch",
        None,
    )
    available = gallery_labels.shape[0] - int(leave_one_out)
    values = {f"R@{k}": float((first_hit < min(k, available)).double().mean()) for k in KS}
    values["MAP@R"] = float(ap[positives > 0].mean())
    return clock.stop(), values


def run(case: dict, metric: str, repeats: int, with_topk: bool) -> None:
    times: dict[str, list[tuple[float, float]]] = {"product": [], "metrics": [], "top-k": []}
    values = topk_values = None
    for _ in range(repeats):
        times["product"].append(time_product(case, metric))
        seconds, values = time_metrics(case, metric)
        times["metrics"].append(seconds)
        if with_topk:
            seconds, topk_values = time_topk(case, metric)
            times["top-k"].append(seconds)
    wall = {key: statistics.median(t[0] for t in value) for key, value in times.items() if value}
    cpu = {key: statistics.median(t[1] for t in value) for key, value in times.items() if value}
    gallery = case["gallery"] if case["gallery"] is not None else case["queries"]
    print(f"{case['name']:<8} {metric:<9} {case['queries'].shape[0]:>7} x {gallery.shape[0]:<7}", flush=True)
    for key in wall:
        print(
            f"    {key:<8} wall {wall[key]:8.2f} s  cpu {cpu[key]:8.2f} s"
            f"  ÷ product: wall {wall[key] / wall['product']:5.2f}  cpu {cpu[key] / cpu['product']:5.2f}"
            + ("  (values identical to metrics: " + str(values == topk_values) + ")" if key == "top-k" else "")
        )
    print("    " + "  ".join(f"{key} {100 * value:.3f}" for key, value in values.items()), flush=True)
    runs = "; ".join(f"{k} " + ", ".join(f"{w:.2f}/{c:.2f}" for w, c in v) for k, v in times.items() if v)
    print("    runs (wall/cpu s): " + runs, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="loo-20k,inshop", help=f"comma-separated: {', '.join(CASES)}")
    parser.add_argument("--metrics", default="cosine", help="comma-separated: cosine, euclidean")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--noise", type=float, default=2.5, help="noise scale relative to the class centres")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every size (quick runs)")
    parser.add_argument("--topk", action="store_true", help="also time the previous top-1000 path")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"d={args.dim}, K={KS} + MAP@R, noise {args.noise}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, medians of {args.repeats}"
    )
    for name in args.cases.split(","):
        case = make_case(name, args.dim, args.noise, args.scale)
        for metric in args.metrics.split(","):
            run(case, metric, args.repeats, args.topk)


if __name__ == "__main__":
    main()
