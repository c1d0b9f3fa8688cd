"""Retrieval metrics: Recall@K, MAP@R and NMI, plus the one-call ``evaluate_embeddings`` and a table printer.

Protocols (seed-spec §7). Without a gallery it is leave-one-out retrieval within the embeddings: every item is
a query against all others, and the query itself is excluded **by index**, so an exact duplicate of the query
still counts as a neighbour (the reference code drops the first column instead, which lets the query's own row
survive when a duplicate ranks first). With ``gallery``/``gallery_labels`` (In-shop) the queries are ranked
against the gallery and nothing is excluded.

Ranking uses ``metric="cosine"`` (L2-normalise, then inner product) or ``"euclidean"`` (raw vectors). Equal
scores are ranked by gallery index, lower first (see ``dmlkd.evaluation.knn``). Every value is a fraction in
[0, 1]. ``R`` of a query is the number of same-label gallery items (minus the query itself in leave-one-out).

* Recall@K: the fraction of *all* queries with at least one same-label item among their K nearest neighbours.
  A query with R = 0 (a singleton class) can never hit and counts as a miss, as in the Proxy-Anchor code.
  K larger than the number of candidates is evaluated on all candidates (with a warning).
* MAP@R (Musgrave et al., "A Metric Learning Reality Check", 2020): AP@R = (1/R) Σ_{i ≤ R} P(i) · rel(i),
  averaged over the queries with R ≥ 1 (queries with R = 0 are excluded; NaN if none is left). Note that the
  Deep-Metric-Learning reference code (DC ``mean_avg_R_precision``) divides by the number of hits within the
  top R instead of by R, so its "mARP" is never lower than this value.
* NMI: k-means with k = number of classes on the embeddings, then normalised mutual information with the
  arithmetic mean of the two entropies as normaliser (as sklearn's default ``normalized_mutual_info_score``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from dmlkd.errors import ConfigError, DataError
from dmlkd.evaluation.kmeans import kmeans
from dmlkd.evaluation.knn import as_embeddings, check_metric, iter_knn, prepare, resolve_backend
from dmlkd.evaluation.ranks import ClassMembers, chunk_stats, counted_retrieval_stats, search_depth

logger = logging.getLogger(__name__)

ArrayLike = Tensor | np.ndarray


def _as_labels(labels: ArrayLike | Sequence[int], num: int, name: str = "labels") -> Tensor:
    tensor = torch.as_tensor(labels)
    if tensor.ndim != 1 or tensor.shape[0] != num:
        raise DataError(f"{name} must have shape ({num},) to match the embeddings, got {tuple(tensor.shape)}")
    if tensor.is_floating_point() and not bool((tensor == tensor.round()).all()):
        raise DataError(f"{name} must be integer class ids, got non-integer values")
    return tensor.long()


def _check_ks(ks: Iterable[int]) -> list[int]:
    ks = [int(k) for k in ks]
    if not ks or any(k <= 0 for k in ks):
        raise ConfigError(f"ks must be a non-empty list of positive integers, got {ks}")
    return ks


def _gallery_side(
    queries: Tensor, query_labels: Tensor, gallery: ArrayLike | None, gallery_labels: ArrayLike | None
) -> tuple[Tensor | None, Tensor]:
    if (gallery is None) != (gallery_labels is None):
        raise ConfigError("gallery and gallery_labels must be given together (or neither, for leave-one-out)")
    if gallery is None:
        return None, query_labels
    gallery = as_embeddings(gallery, "gallery").to(queries.device)
    return gallery, _as_labels(gallery_labels, gallery.shape[0], "gallery_labels").to(queries.device)


def count_positives(query_labels: Tensor, gallery_labels: Tensor, leave_one_out: bool) -> Tensor:
    """``R`` per query: same-label gallery items, minus the query itself in leave-one-out; ``(N,)`` int64."""
    _, inverse = torch.unique(torch.cat([query_labels, gallery_labels]), return_inverse=True)
    query_ids, gallery_ids = inverse[: query_labels.shape[0]], inverse[query_labels.shape[0] :]
    counts = torch.bincount(gallery_ids, minlength=int(inverse.max()) + 1)
    return counts[query_ids] - int(leave_one_out)


def retrieval_metrics(
    embeddings: ArrayLike,
    labels: ArrayLike,
    ks: Iterable[int] = (1,),
    metric: str = "cosine",
    gallery: ArrayLike | None = None,
    gallery_labels: ArrayLike | None = None,
    with_map: bool = True,
    backend: str = "auto",
    max_bytes: int | None = None,
) -> tuple[dict[int, float], float | None]:
    """Recall@K for every K and (optionally) MAP@R from one memory-bounded pass over the score blocks.

    The torch backend ranks by counting (``dmlkd.evaluation.ranks``): a shallow top-``max(largest R, 16)``
    search plus, for queries whose best positive lies deeper, a count of the candidates ranked before it, so
    every K costs the same. The faiss backend searches ``max(max(ks), largest R)`` neighbours (capped at the
    number of candidates). Both give the same values. Memory: the chunk budget ``max_bytes`` (default 1 GiB)
    plus O(N) per-query state.

    Returns:
        ``({K: recall}, map_at_r)``; ``map_at_r`` is None when ``with_map`` is False.
    """
    check_metric(metric)
    resolve_backend(backend)
    ks = _check_ks(ks)
    queries = as_embeddings(embeddings)
    query_labels = _as_labels(labels, queries.shape[0]).to(queries.device)
    gallery, gallery_labels = _gallery_side(queries, query_labels, gallery, gallery_labels)
    leave_one_out = gallery is None
    if resolve_backend(backend) == "torch":  # the counting path needs each class's gallery columns anyway
        members = ClassMembers(query_labels, gallery_labels)
        positives = members.positives(leave_one_out)
    else:
        members, positives = None, count_positives(query_labels, gallery_labels, leave_one_out)
    available = gallery_labels.shape[0] - int(leave_one_out)
    if available < 1:
        raise DataError("retrieval needs at least 2 embeddings (or a non-empty gallery)")
    if max(ks) > available:
        logger.warning("K=%d exceeds the %d candidates per query; using all candidates", max(ks), available)
    largest_r = int(positives.max())
    if resolve_backend(backend) == "torch":
        depth = search_depth(ks, largest_r, with_map, available)
        prepared = prepare(queries, metric)
        gallery = None if leave_one_out else prepare(gallery, metric).to(dtype=prepared.dtype)
        first_hit, ap = counted_retrieval_stats(
            prepared, query_labels, gallery, gallery_labels, positives, depth, max(ks), metric, max_bytes, members
        )
    else:
        first_hit, ap = _topk_retrieval_stats(
            queries, query_labels, gallery, gallery_labels, positives, ks, with_map, metric, backend, max_bytes
        )
    recall = {kk: float((first_hit < min(kk, available)).double().mean()) for kk in ks}
    if not with_map:
        return recall, None
    has_positive = positives > 0
    if not bool(has_positive.any()):
        logger.warning("no query has a same-label item to retrieve; MAP@R is undefined (NaN)")
        return recall, math.nan
    return recall, float(ap[has_positive].mean())


def _topk_retrieval_stats(
    queries: Tensor,
    query_labels: Tensor,
    gallery: Tensor | None,
    gallery_labels: Tensor,
    positives: Tensor,
    ks: list[int],
    with_map: bool,
    metric: str,
    backend: str,
    max_bytes: int | None,
) -> tuple[Tensor, Tensor]:
    """First-hit rank (capped at the search depth) and AP@R from a ``max(max K, largest R)``-deep kNN search.

    The path for backends that return neighbours (faiss); the torch backend counts ranks instead
    (``dmlkd.evaluation.ranks``), with the same values.
    """
    available = gallery_labels.shape[0] - int(gallery is None)
    k = min(max(max(ks), int(positives.max()) if with_map else 0), available)
    first_hit = torch.empty(queries.shape[0], dtype=torch.long, device=queries.device)
    ap = torch.zeros(queries.shape[0], dtype=torch.float64, device=queries.device)
    for start, _scores, indices in iter_knn(queries, gallery, k, metric, backend, max_bytes):
        rows = slice(start, start + indices.shape[0])
        matches = gallery_labels[indices] == query_labels[rows].unsqueeze(1)
        first_hit[rows], ap[rows] = chunk_stats(matches, positives[rows])
    return first_hit, ap


def recall_at_k(
    embeddings: ArrayLike,
    labels: ArrayLike,
    ks: Iterable[int],
    metric: str = "cosine",
    gallery: ArrayLike | None = None,
    gallery_labels: ArrayLike | None = None,
    backend: str = "auto",
    max_bytes: int | None = None,
) -> dict[int, float]:
    """Recall@K in [0, 1] for each K (module docstring: protocol, singleton queries count as misses).

    Args:
        embeddings: ``(N, D)`` query embeddings (the whole set in leave-one-out); torch or numpy.
        labels: ``(N,)`` integer class ids.
        ks: the K values, e.g. ``(1, 2, 4, 8)``.
        metric: ``"cosine"`` or ``"euclidean"``.
        gallery, gallery_labels: ``(G, D)`` and ``(G,)`` for query/gallery retrieval, else leave-one-out.
        backend: kNN backend ``"auto"`` (torch), ``"torch"`` or ``"faiss"``.
        max_bytes: kNN working-set budget per query chunk (default 1 GiB).

    Example:
        >>> recall_at_k(torch.randn(100, 16), torch.arange(100) // 5, ks=(1, 2, 4))  # doctest: +SKIP
        {1: 0.06, 2: 0.1, 4: 0.18}
    """
    recall, _ = retrieval_metrics(embeddings, labels, ks, metric, gallery, gallery_labels, False, backend, max_bytes)
    return recall


def map_at_r(
    embeddings: ArrayLike,
    labels: ArrayLike,
    metric: str = "cosine",
    gallery: ArrayLike | None = None,
    gallery_labels: ArrayLike | None = None,
    backend: str = "auto",
    max_bytes: int | None = None,
) -> float:
    """Standard MAP@R in [0, 1] (divides by R, not by the hits); queries with R = 0 are excluded.

    Arguments as in ``recall_at_k``. Only ``max R`` neighbours are searched (the largest class), never the
    whole gallery.
    """
    _, value = retrieval_metrics(embeddings, labels, (1,), metric, gallery, gallery_labels, True, backend, max_bytes)
    return float(value)


def normalized_mutual_info(labels_true: ArrayLike, labels_pred: ArrayLike) -> float:
    """NMI of two labellings with arithmetic-mean normalisation, from the sparse contingency table.

    NMI = I(U; V) / ((H(U) + H(V)) / 2). Two single-cluster labellings give 1.0 and independent ones 0.0
    (sklearn's conventions). Computed in float64.
    """
    true = torch.as_tensor(labels_true).reshape(-1)
    pred = torch.as_tensor(labels_pred).reshape(-1)
    if true.shape != pred.shape:
        raise DataError(f"label vectors differ in length: {true.shape[0]} and {pred.shape[0]}")
    _, true_ids = torch.unique(true, return_inverse=True)
    _, pred_ids = torch.unique(pred, return_inverse=True)
    num_true, num_pred = int(true_ids.max()) + 1, int(pred_ids.max()) + 1
    if num_true == num_pred == 1:
        return 1.0
    pairs, joint = torch.unique(true_ids * num_pred + pred_ids, return_counts=True)  # non-zero cells only
    n = float(true.shape[0])
    row = torch.bincount(true_ids).double()
    col = torch.bincount(pred_ids).double()
    joint = joint.double()
    mi = joint / n * (joint.log() + math.log(n) - row[pairs // num_pred].log() - col[pairs % num_pred].log())
    mi = max(float(mi.sum()), 0.0)
    if mi == 0.0:
        return 0.0
    h_true = float(-(row / n * (row / n).log()).sum())
    h_pred = float(-(col / n * (col / n).log()).sum())
    return mi / max((h_true + h_pred) / 2, np.finfo(np.float64).eps)


KMEANS_PP_MAX_CLUSTERS = 256  # above this, k-means++ seeding (k sequential passes) costs more than Lloyd itself


def nmi(
    embeddings: ArrayLike,
    labels: ArrayLike,
    seed: int = 0,
    backend: str = "auto",
    niter: int = 100,
    max_bytes: int | None = None,
) -> float:
    """NMI in [0, 1] between the classes and a k-means clustering (k = number of classes) of the embeddings.

    The embeddings are clustered as given (``evaluate_embeddings`` L2-normalises them first for the cosine
    metric). ``backend="auto"``/``"torch"`` uses the seeded torch k-means of ``dmlkd.evaluation.kmeans``:
    k-means++ seeding for up to ``KMEANS_PP_MAX_CLUSTERS`` classes (CUB, Cars), and k distinct random points,
    as faiss seeds, for more (SOP's 11,316, In-shop's 3,985): k-means++ makes k sequential memory-bound passes
    over the points, 20x the whole clustering's time at 10,000 points in 2,000 classes, for an NMI within its
    own seed variance (docs/benchmarks.md). Either way the cost is bounded by ``niter`` chunked assignment
    products of ``N × k × D``, within ``max_bytes`` per chunk. ``"faiss"`` uses ``faiss.Kmeans`` (DC's choice,
    niter 100).
    """
    points = as_embeddings(embeddings)
    targets = _as_labels(labels, points.shape[0])
    num_classes = int(torch.unique(targets).numel())
    init = "k-means++" if num_classes <= KMEANS_PP_MAX_CLUSTERS else "random"
    clusters = kmeans(points, num_classes, seed=seed, niter=niter, backend=backend, max_bytes=max_bytes, init=init)
    return normalized_mutual_info(targets.cpu(), clusters.cpu())


def evaluate_embeddings(
    embeddings: ArrayLike,
    labels: ArrayLike,
    ks: Iterable[int] = (1, 2, 4, 8),
    metric: str = "cosine",
    gallery: ArrayLike | None = None,
    gallery_labels: ArrayLike | None = None,
    compute_nmi: bool = True,
    seed: int = 0,
    backend: str = "auto",
    max_bytes: int | None = None,
) -> dict[str, float]:
    """All metrics in one call: ``{"recall@1": ..., ..., "map@r": ..., "nmi": ...}`` (fractions in [0, 1]).

    Recall@K and MAP@R share one kNN pass. NMI (when ``compute_nmi``) clusters the embeddings, L2-normalised
    for ``metric="cosine"``; with a gallery it clusters queries and gallery together (DC's In-shop protocol).

    Example:
        >>> results = evaluate_embeddings(embeddings, labels, ks=(1, 2, 4, 8))  # doctest: +SKIP
        >>> print(format_table(results))                                       # doctest: +SKIP
    """
    ks = _check_ks(ks)
    recall, map_value = retrieval_metrics(
        embeddings, labels, ks, metric, gallery, gallery_labels, True, backend, max_bytes
    )
    results = {f"recall@{k}": recall[k] for k in ks}
    results["map@r"] = float(map_value)
    if compute_nmi:
        points, targets = torch.as_tensor(embeddings), torch.as_tensor(labels)
        if gallery is not None:
            points = torch.cat([as_embeddings(points), as_embeddings(gallery).to(points.device)])
            targets = torch.cat([targets.reshape(-1), torch.as_tensor(gallery_labels).reshape(-1)])
        points = prepare(as_embeddings(points), metric)
        results["nmi"] = nmi(points, targets, seed=seed, backend=backend, max_bytes=max_bytes)
    return results


def _column_name(key: str) -> str:
    if key.startswith("recall@"):
        return "R@" + key.split("@", 1)[1]
    return {"map@r": "MAP@R", "nmi": "NMI"}.get(key, key)


def format_table(results: dict[str, float]) -> str:
    """A two-line aligned table; known metrics (``recall@K``, ``map@r``, ``nmi``) as percentages, 1 decimal.

    Example:
        >>> print(format_table({"recall@1": 0.6523, "recall@2": 0.7611, "map@r": 0.2412, "nmi": 0.6871}))
         R@1   R@2  MAP@R   NMI
        65.2  76.1   24.1  68.7
    """
    known = [key for key in results if key.startswith("recall@") or key in ("map@r", "nmi")]
    recall_keys = sorted((key for key in known if key.startswith("recall@")), key=lambda key: int(key[7:]))
    keys = recall_keys + [key for key in ("map@r", "nmi") if key in results]
    keys += [key for key in results if key not in known]
    names, values = [], []
    for key in keys:
        value = results[key]
        names.append(_column_name(key))
        if key in known and isinstance(value, (int, float)):
            values.append(f"{100 * value:.1f}")
        else:
            values.append(f"{value:.4g}" if isinstance(value, float) else str(value))
    widths = [max(len(name), len(value)) for name, value in zip(names, values)]
    header = "  ".join(name.rjust(width) for name, width in zip(names, widths))
    row = "  ".join(value.rjust(width) for value, width in zip(values, widths))
    return header + "\n" + row
