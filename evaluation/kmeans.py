"""k-means for the NMI metric: a seeded pure-torch k-means++ / Lloyd, or faiss.Kmeans when asked for.

The torch version is deterministic for a given ``seed`` and device, runs on the device of its input, and
bounds memory like the kNN search: the point-to-centroid distances are computed in chunks of rows (each
chunk ``c × k`` floats within ``max_bytes``). Its cost is O(niter · N · k · D) for Lloyd plus O(N · k · D) for
the k-means++ seeding, the same order as faiss's exhaustive k-means.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from dmlkd.evaluation.knn import DEFAULT_MAX_BYTES, import_faiss, resolve_backend

INITS = ("k-means++", "random")


def kmeans(
    x: Tensor,
    num_clusters: int,
    seed: int = 0,
    niter: int = 100,
    backend: str = "auto",
    max_bytes: int | None = None,
    init: str = "k-means++",
    tol: float = 0.0,
    info: dict | None = None,
) -> Tensor:
    """Cluster the rows of ``x`` and return ``(N,)`` int64 cluster ids in ``[0, num_clusters)``.

    Args:
        x: ``(N, D)`` float points (N >= num_clusters).
        num_clusters: k.
        seed: seeds the initialisation (torch) or faiss's.
        niter: at most this many Lloyd iterations.
        backend: ``"auto"``/``"torch"`` or ``"faiss"`` (``faiss.Kmeans``, which subsamples to 256 points per
            centroid by default, as DC used it).
        max_bytes: memory budget of one distance chunk (default 1 GiB).
        init: torch initialisation: ``"k-means++"`` (D² sampling: k sequential passes over the points, each a
            memory-bound mat-vec) or ``"random"`` (k distinct points drawn uniformly, as faiss does; no pass).
        tol: the torch version stops once at most ``tol · N`` assignments change in an iteration (0: only when
            none changes).
        info: if given, filled with ``iterations`` (Lloyd assignments computed) and ``changed`` (assignments
            that changed in the last iteration).
    """
    if not 1 <= num_clusters <= x.shape[0]:
        raise ValueError(f"num_clusters={num_clusters} must be between 1 and the number of points {x.shape[0]}")
    if init not in INITS:
        raise ValueError(f"unknown k-means init {init!r}; valid: {', '.join(INITS)}")
    if resolve_backend(backend) == "faiss":
        return _kmeans_faiss(x, num_clusters, seed, niter)
    generator = torch.Generator().manual_seed(seed)
    if init == "k-means++":
        centroids = kmeans_plus_plus(x, num_clusters, generator)
    else:
        centroids = x[torch.randperm(x.shape[0], generator=generator)[:num_clusters].to(x.device)].clone()
    assignment, iterations, changed = None, 0, -1
    for _ in range(niter):
        new_assignment, distances = assign(x, centroids, max_bytes)
        iterations += 1
        if assignment is not None:
            changed = int((new_assignment != assignment).sum())
            if changed <= tol * x.shape[0]:
                assignment = new_assignment
                break
        assignment = new_assignment
        centroids = update_centroids(x, assignment, distances, num_clusters)
    if assignment is None:  # niter == 0: the seeding alone
        assignment, _ = assign(x, centroids, max_bytes)
    if info is not None:
        info.update(iterations=iterations, changed=changed)
    return assignment


def kmeans_plus_plus(x: Tensor, num_clusters: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): ``(k, D)`` centroids picked among the rows of ``x``.

    Each next centre is drawn with probability proportional to the squared distance to the nearest centre so
    far (inverse-CDF sampling with a CPU generator, so results do not depend on the device's RNG).
    """
    n = x.shape[0]
    x_sq = x.pow(2).sum(dim=1)

    def squared_distance_to(row: int) -> Tensor:  # one mat-vec, no (N, D) temporary
        return (x_sq - 2 * (x @ x[row]) + x_sq[row]).clamp_(min=0)

    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    min_sq = squared_distance_to(first)
    for _ in range(1, num_clusters):
        cumulative = min_sq.double().cumsum(0)
        total = float(cumulative[-1])
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        if total > 0:
            pick = int(
                torch.searchsorted(
                    cumulative,
                    torch.tensor([u * total], dtype=cumulative.dtype, device=cumulative.device),
                    right=True,
                )
            )
            pick = min(pick, n - 1)
        else:  # every point coincides with a centre: any point will do
            pick = min(int(u * n), n - 1)
        chosen.append(pick)
        min_sq = torch.minimum(min_sq, squared_distance_to(pick))
    return x[chosen].clone()


def assign(x: Tensor, centroids: Tensor, max_bytes: int | None = None) -> tuple[Tensor, Tensor]:
    """Nearest centroid of every row, in row chunks: ``(assignment (N,) int64, squared distance (N,))``."""
    budget = DEFAULT_MAX_BYTES if max_bytes is None else int(max_bytes)
    rows = max(1, budget // (3 * centroids.shape[0] * x.element_size()))
    centroid_sq = centroids.pow(2).sum(dim=1)
    labels, distances = [], []
    for start in range(0, x.shape[0], rows):
        chunk = x[start : start + rows]
        sq = (chunk @ centroids.T).mul_(-2).add_(centroid_sq).add_(chunk.pow(2).sum(dim=1, keepdim=True))
        best, label = sq.min(dim=1)
        labels.append(label)
        distances.append(best.clamp_(min=0))
    return torch.cat(labels), torch.cat(distances)


def update_centroids(x: Tensor, assignment: Tensor, distances: Tensor, num_clusters: int) -> Tensor:
    """Means of the clusters; an empty cluster takes the point farthest from its centroid (deterministic)."""
    sums = torch.zeros(num_clusters, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, assignment, x)
    counts = torch.bincount(assignment, minlength=num_clusters)
    centroids = sums / counts.clamp(min=1).unsqueeze(1).to(x.dtype)
    empty = (counts == 0).nonzero().squeeze(1)
    if empty.numel():
        farthest = torch.argsort(distances, descending=True, stable=True)[: empty.numel()]
        centroids[empty] = x[farthest]
    return centroids


def _kmeans_faiss(x: Tensor, num_clusters: int, seed: int, niter: int) -> Tensor:
    faiss = import_faiss()
    points = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    model = faiss.Kmeans(points.shape[1], num_clusters, niter=niter, seed=seed, verbose=False)
    model.train(points)
    _, labels = model.index.search(points, 1)
    return torch.from_numpy(labels[:, 0]).long().to(x.device)
