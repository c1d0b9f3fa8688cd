"""Exact, memory-bounded k-nearest-neighbour search for retrieval evaluation.

The torch backend never builds an ``N × N`` matrix: queries are processed in chunks of ``c`` rows, and each
chunk materialises only its ``c × G`` score block (``G`` = gallery size) and a few same-sized temporaries
(comparison masks, the tie-break cumsum). ``chunk_rows`` sizes ``c`` from a byte budget:

    bytes per query row ≈ G · (2 · itemsize + 12) + 48 · k      (itemsize = 4 for float32)

so with the default budget of 1 GiB and k = 1,000 a 60,000-image gallery is searched in chunks of 860 rows
and a 1,000,000-image gallery in chunks of 53 rows. On top of the budget, the caller pays an L2-normalised
copy of the embeddings for ``metric="cosine"`` (``N · D · 4`` bytes: 123 MB for 60,000 × 512, 512 MB for
1,000,000 × 128) and O(N) per-query results, so both stated cases (60k × 512 within 2 GB, 1M × 128 within
24 GB) fit with room to spare.

Ranking is "larger score is closer": the score is the cosine similarity for ``metric="cosine"``
(L2-normalise, then inner product) and the *negative squared* Euclidean distance ``-(‖q‖² + ‖g‖² − 2 q·g)``
on the raw vectors for ``metric="euclidean"``. **Ties** are broken deterministically: equal scores are ranked
by gallery index, lower first, both for which items make the top k and for their order, so results do not
depend on the chunk size. In leave-one-out mode the query itself is excluded *by index* (its score is set to
``-inf``), never by dropping the first neighbour, which is wrong when a gallery holds exact duplicates of the
query.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dmlkd.errors import ConfigError, DataError, choices

logger = logging.getLogger(__name__)

METRICS = ("cosine", "euclidean")
BACKENDS = ("auto", "torch", "faiss")
DEFAULT_MAX_BYTES = 1 << 30  # working-set budget of one query chunk (1 GiB)


def as_embeddings(x: Tensor | np.ndarray, name: str = "embeddings") -> Tensor:
    """A ``(N, D)`` float tensor (float16/bfloat16/integers become float32); NaN/Inf values are an error."""
    tensor = torch.as_tensor(x)
    if tensor.ndim != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise DataError(f"{name} must be a non-empty (N, D) array, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.float()
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).any(dim=1).sum())
        raise DataError(f"{name} contain NaN or Inf in {bad} of {tensor.shape[0]} rows; the model has diverged")
    return tensor


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; valid: {choices(METRICS)}")


def resolve_backend(backend: str) -> str:
    """``auto`` means torch (exact, deterministic ties, no extra dependency); ``faiss`` must be installed."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown kNN backend {backend!r}; valid: {choices(BACKENDS)}")
    if backend == "faiss":
        import_faiss()
        return "faiss"
    return "torch"


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise ConfigError('backend "faiss" needs faiss; install it with: pip install "dmlkd[faiss]"') from None
    return faiss


def prepare(x: Tensor, metric: str) -> Tensor:
    """Cosine: an L2-normalised copy; Euclidean: the raw vectors."""
    return F.normalize(x, dim=1) if metric == "cosine" else x


def chunk_rows(num_gallery: int, k: int, itemsize: int = 4, max_bytes: int | None = None) -> int:
    """How many query rows fit the byte budget (at least one); see the module docstring for the formula."""
    budget = DEFAULT_MAX_BYTES if max_bytes is None else int(max_bytes)
    per_row = num_gallery * (2 * itemsize + 12) + 48 * k
    return max(1, budget // per_row)


def _scores(query: Tensor, gallery: Tensor, gallery_sq: Tensor | None, out: Tensor | None = None) -> Tensor:
    """``(c, G)`` scores, larger = closer: inner products, or minus squared distances with ``gallery_sq``.

    The distance form is one GEMM that adds ``-‖g‖²`` while it accumulates ``2 q·g``, then one pass for
    ``-‖q‖²`` (two passes over the block instead of three).
    """
    if gallery_sq is None:
        return torch.matmul(query, gallery.T, out=out)
    scores = torch.addmm(gallery_sq.neg().unsqueeze(0), query, gallery.T, alpha=2, out=out)
    return scores.sub_(query.pow(2).sum(dim=1, keepdim=True))


def score_chunks(queries: Tensor, gallery: Tensor | None, metric: str, rows: int) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(start, scores)``: the ``(c, G)`` score block of each chunk of ``rows`` queries.

    ``queries``/``gallery`` must already be prepared (``prepare``: L2-normalised for cosine) and on one
    device; ``gallery=None`` is leave-one-out, where each query's own column is set to ``-inf``. The blocks
    share one buffer, so each is valid only until the next one is produced (reusing it saves faulting in
    ``c × G`` fresh pages per chunk).
    """
    exclude_self = gallery is None
    gallery = queries if exclude_self else gallery
    gallery_sq = gallery.pow(2).sum(dim=1) if metric == "euclidean" else None
    buffer = None
    for start in range(0, queries.shape[0], rows):
        chunk = queries[start : start + rows]
        if buffer is None:
            buffer = torch.empty(chunk.shape[0], gallery.shape[0], dtype=queries.dtype, device=queries.device)
        scores = _scores(chunk, gallery, gallery_sq, out=buffer[: chunk.shape[0]])
        if exclude_self:
            position = torch.arange(chunk.shape[0], device=scores.device)
            scores[position, position + start] = float("-inf")
        yield start, scores


def topk_lowest_index(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row with ties broken by column index (lower first), sorted by (score desc, index asc).

    ``torch.topk`` alone picks an arbitrary subset of the items tied with the k-th score; for rows where the
    (k+1)-th score equals the k-th (more items reach it than fit), the subset is recomputed as "everything
    strictly better, then the lowest-indexed tied items". Modifies nothing; returns ``(values, indices)``,
    each ``(c, k)``.
    """
    if k >= scores.shape[1]:  # everything is selected: only the order is left to fix
        values, indices = torch.topk(scores, k, dim=1)
        return sort_by_score_then_index(values, indices)
    # One extra neighbour tells cheaply whether a tie straddles the k-th place.
    values, indices = torch.topk(scores, k + 1, dim=1)
    ambiguous = values[:, k] == values[:, k - 1]
    values, indices = values[:, :k], indices[:, :k]
    kth = values[:, -1:]
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero().squeeze(1)
        sub, sub_kth = scores[rows], kth[rows]
        better = sub > sub_kth
        tied = sub == sub_kth
        room = k - better.sum(dim=1, keepdim=True)
        take = better | (tied & (tied.cumsum(dim=1) <= room))
        cols = take.nonzero()[:, 1].view(-1, k)  # row-major: each row has exactly k hits
        indices[rows] = cols
        values[rows] = sub.gather(1, cols)
    return sort_by_score_then_index(values, indices)


def sort_by_score_then_index(values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Order each row by score (descending), equal scores by index (ascending).

    Rows that are already strictly descending (``topk`` output without ties: nearly all) are left as they are;
    only the others are sorted, which saves two row-wise sorts per chunk.
    """
    if values.shape[1] < 2:
        return values, indices
    unsorted = (values[:, :-1] <= values[:, 1:]).any(dim=1).nonzero().squeeze(1)
    if unsorted.numel() == 0:
        return values, indices
    values, indices = values.clone(), indices.clone()
    sub_indices, order = indices[unsorted].sort(dim=1)
    sub_values, order = values[unsorted].gather(1, order).sort(dim=1, descending=True, stable=True)
    values[unsorted], indices[unsorted] = sub_values, sub_indices.gather(1, order)
    return values, indices


def iter_knn(
    queries: Tensor,
    gallery: Tensor | None,
    k: int,
    metric: str = "cosine",
    backend: str = "auto",
    max_bytes: int | None = None,
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Yield ``(start, scores, indices)`` for consecutive query chunks.

    Args:
        queries: ``(N, D)`` query embeddings; the search runs on their device.
        gallery: ``(G, D)`` gallery embeddings, or ``None`` for leave-one-out retrieval within ``queries``
            (query ``i`` is excluded by index, so ``k`` must be at most ``N - 1``).
        k: neighbours per query (at most the number of candidates).
        metric: ``"cosine"`` or ``"euclidean"``.
        backend: ``"auto"``/``"torch"`` (exact, ties by lower index) or ``"faiss"`` (CPU, or GPU when the
            queries are on CUDA and faiss has GPU support; ties inside the returned list are re-sorted by
            index, but which of several items tied at the k-th place faiss returns is up to faiss).
        max_bytes: working-set budget of one chunk (default 1 GiB).

    Yields:
        ``start`` (row of the chunk's first query), ``scores`` ``(c, k)`` (larger = closer: cosine similarity
        or negative squared Euclidean distance) and ``indices`` ``(c, k)`` int64 gallery positions.
    """
    check_metric(metric)
    backend = resolve_backend(backend)
    exclude_self = gallery is None
    queries = prepare(as_embeddings(queries, "queries"), metric)
    gallery = queries if gallery is None else prepare(as_embeddings(gallery, "gallery"), metric)
    gallery = gallery.to(device=queries.device, dtype=queries.dtype)
    if gallery.shape[1] != queries.shape[1]:
        raise DataError(f"query dimension {queries.shape[1]} differs from gallery dimension {gallery.shape[1]}")
    available = gallery.shape[0] - int(exclude_self)
    if not 1 <= k <= available:
        raise ConfigError(f"k={k} neighbours requested but only {available} candidates exist per query")
    if backend == "faiss":
        yield from _iter_faiss(queries, gallery, k, metric, exclude_self, max_bytes)
    else:
        yield from _iter_torch(queries, gallery, k, metric, exclude_self, max_bytes)


def _iter_torch(
    queries: Tensor, gallery: Tensor, k: int, metric: str, exclude_self: bool, max_bytes: int | None
) -> Iterator[tuple[int, Tensor, Tensor]]:
    rows = chunk_rows(gallery.shape[0], k, queries.element_size(), max_bytes)
    for start, scores in score_chunks(queries, None if exclude_self else gallery, metric, rows):
        values, indices = topk_lowest_index(scores, k)
        yield start, values, indices


def _faiss_index(gallery: np.ndarray, metric: str, on_cuda: bool, device_index: int):
    faiss = import_faiss()
    index = faiss.IndexFlatIP(gallery.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(gallery.shape[1])
    if on_cuda and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device_index, index)
    index.add(gallery)
    return index


def _iter_faiss(
    queries: Tensor, gallery: Tensor, k: int, metric: str, exclude_self: bool, max_bytes: int | None
) -> Iterator[tuple[int, Tensor, Tensor]]:
    device = queries.device
    query_np = np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32)
    gallery_np = query_np if exclude_self else np.ascontiguousarray(gallery.detach().cpu().numpy(), np.float32)
    index = _faiss_index(gallery_np, metric, device.type == "cuda", device.index or 0)
    extra = int(exclude_self)  # search one more and drop the query itself (or the last item if it is absent)
    # faiss blocks the distance computation internally; the (c, k + 1) results and the copies made while
    # re-sorting them (about 128 bytes per entry in all) count against the budget.
    rows = max(1, (DEFAULT_MAX_BYTES if max_bytes is None else int(max_bytes)) // (128 * (k + extra)))
    for start in range(0, query_np.shape[0], rows):
        found, indices = index.search(query_np[start : start + rows], k + extra)
        scores = torch.from_numpy(found if metric == "cosine" else -found)
        indices = torch.from_numpy(indices).long()
        if exclude_self:
            own = torch.arange(start, start + indices.shape[0]).unsqueeze(1)
            scores = scores.masked_fill(indices == own, float("-inf"))
        scores, indices = sort_by_score_then_index(scores, indices)
        yield start, scores[:, :k].to(device), indices[:, :k].to(device)


def knn(
    queries: Tensor | np.ndarray,
    gallery: Tensor | np.ndarray | None,
    k: int,
    metric: str = "cosine",
    backend: str = "auto",
    max_bytes: int | None = None,
) -> tuple[Tensor, Tensor]:
    """All ``k`` nearest neighbours at once: ``(scores, indices)``, each ``(N, k)``; see ``iter_knn``.

    Holds ``N · k`` results (12 bytes each); metrics use ``iter_knn`` instead and keep O(N) state.

    Example:
        >>> scores, indices = knn(embeddings, None, k=4)      # leave-one-out, cosine  # doctest: +SKIP
    """
    parts = list(
        iter_knn(
            torch.as_tensor(queries),
            None if gallery is None else torch.as_tensor(gallery),
            k,
            metric,
            backend,
            max_bytes,
        )
    )
    return torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
