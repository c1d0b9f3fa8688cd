"""Time and peak extra memory of Recall@K + MAP@R (leave-one-out, cosine) as the test set grows.

Usage:
    python bench/eval_scaling.py [--sizes 10000,60000,200000] [--dim 512] [--backends torch,faiss]
                                 [--max-bytes 1073741824] [--max-queries 20000]

Each (size, backend) case runs in a fresh subprocess. The worker builds SOP-like data (class sizes 2..8,
about 5 per class, class centre plus noise) in place, records its resident set size (RSS), runs
``dmlkd.evaluation.retrieval_metrics`` with K = 1, 10, 100, 1000 and MAP@R, and reports the growth of its
peak RSS (``ru_maxrss``) over the RSS before the evaluation: the extra memory the evaluation needed, torch
and faiss allocations included (tracemalloc would not see them). The input embeddings are not counted.

With ``--max-queries M`` and N > M, only the first M items are searched against all N (query/gallery mode,
so each query finds itself and the printed metrics are meaningless) and the time is extrapolated linearly to
N queries (the cost is proportional to the number of queries; the per-chunk memory is the same as for the
full run). Such rows are marked ``est.``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

KS = (1, 10, 100, 1000)


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def sop_like_data(num: int, dim: int, seed: int = 0):
    """Embeddings ``(num, dim)`` filled chunk by chunk (no full-size temporaries) and labels ``(num,)``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(2, 9, (num // 2 + 1,), generator=generator)
    labels = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)[:num]
    centres = torch.randn(int(labels.max()) + 1, dim, generator=generator)
    embeddings = torch.empty(num, dim)
    for start in range(0, num, 8192):
        rows = slice(start, start + 8192)
        noise = torch.randn(embeddings[rows].shape, generator=generator)
        embeddings[rows] = centres[labels[rows]] + 2.5 * noise
    return embeddings, labels


def worker(num: int, dim: int, backend: str, max_bytes: int | None, max_queries: int | None) -> dict:
    import torch

    from dmlkd.evaluation import retrieval_metrics
    from dmlkd.evaluation.knn import chunk_rows

    embeddings, labels = sop_like_data(num, dim)
    if backend == "faiss":
        import faiss  # noqa: F401 - load the library before the baseline so its code pages are not counted
    rss_before, peak_before = current_rss_bytes(), peak_rss_bytes()
    queries = num if max_queries is None else min(num, max_queries)
    gallery = {} if queries == num else {"gallery": embeddings, "gallery_labels": labels}
    start = time.perf_counter()
    recall, map_r = retrieval_metrics(
        embeddings[:queries], labels[:queries], KS, "cosine", backend=backend, max_bytes=max_bytes, **gallery
    )
    seconds = (time.perf_counter() - start) * num / queries
    return {
        "n": num,
        "dim": dim,
        "backend": backend,
        "queries": queries,
        "seconds": seconds,
        "extra_peak_mb": (peak_rss_bytes() - rss_before) / 2**20,
        "setup_overshoot_mb": (peak_before - rss_before) / 2**20,
        "input_mb": embeddings.numel() * 4 / 2**20,
        "rows_per_chunk": chunk_rows(num, max(KS), 4, max_bytes),
        "threads": torch.get_num_threads(),
        "recall@1": recall[1],
        "recall@1000": recall[1000],
        "map@r": map_r,
    }


def run_case(num: int, dim: int, backend: str, max_bytes: int | None, max_queries: int | None) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--sizes",
        str(num),
        "--dim",
        str(dim),
        "--backends",
        backend,
    ]
    for flag, value in (("--max-bytes", max_bytes), ("--max-queries", max_queries)):
        command += [] if value is None else [flag, str(value)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"n": num, "dim": dim, "backend": backend, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_row(result: dict) -> str:
    if "error" in result:
        return f"{result['n']:>8}  {result['backend']:<6}  failed: {result['error']}"
    return (
        f"{result['n']:>8}  {result['backend']:<6}  {result['seconds']:>9.1f}"
        f"  {result['extra_peak_mb']:>12.0f}"
        f"  {result['input_mb']:>9.0f}  {result['rows_per_chunk']:>6}  {100 * result['recall@1']:>6.1f}"
        f"  {100 * result['map@r']:>6.1f}"
        + ("" if result["queries"] == result["n"] else f"  est. from {result['queries']} queries")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,60000,200000", help="comma-separated N values")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--backends", default="torch,faiss", help="comma-separated: torch, faiss")
    parser.add_argument("--max-bytes", type=int, default=None, help="kNN chunk budget (default 1 GiB)")
    parser.add_argument("--max-queries", type=int, default=None, help="time M queries, extrapolate to N")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    backends = args.backends.split(",")
    if args.worker:
        print(json.dumps(worker(sizes[0], args.dim, backends[0], args.max_bytes, args.max_queries)))
        return
    print(f"d={args.dim}, K={KS}, cosine, leave-one-out, {os.cpu_count()} CPUs")
    print("       N  backend  seconds  extra peak MB   input MB   rows/chunk   R@1  MAP@R")
    for num in sizes:
        for backend in backends:
            result = run_case(num, args.dim, backend, args.max_bytes, args.max_queries)
            print(format_row(result), flush=True)
            print("  " + json.dumps(result), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
