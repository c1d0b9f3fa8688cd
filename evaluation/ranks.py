"""Exact Recall@K and MAP@R from ranks: a shallow top-k plus counting, instead of a top-1000 search.

Neither metric needs the neighbours themselves. Recall@K only needs the rank of each query's best positive
(``rank < K`` is a hit), and MAP@R only the ranks of its R positives among the first R places. With ranks
defined exactly as the kNN search orders candidates (score descending, equal scores by gallery index, lower
first, the query itself excluded by index in leave-one-out), the rank of a gallery item ``p`` with score ``b``
is

    rank(p) = #{j : s_j > b} + #{j < p : s_j = b}.

Per query chunk (``c × G`` scores, the same chunked product as ``dmlkd.evaluation.knn``):

1. a top-``depth`` search with ``depth = max(largest R, min(max K, 16))`` (R ≤ 11 on SOP, ≤ 59 on CUB). It
   gives AP@R of every query (AP@R only looks at the first R places) and the rank of the best positive for
   every query that has one among its first ``depth`` neighbours;
2. for the other queries that have a positive, the best positive ``(b, p)`` is read from the score row at the
   class members' columns, and its rank is counted with the formula above (``s > b`` over the row, plus the
   lower-indexed ties, which are counted only for rows that have any).

So the values equal those of the top-1000 path for every K at once, while the cost over the bare matrix product
is one shallow ``topk`` per chunk plus two comparison passes over the rows whose best positive is not among
their first ``depth`` neighbours.

Memory per query row, within the kNN budget ``max_bytes``: the score row (``G · itemsize``), at most one copy
of it plus one float buffer for the counted rows, and the class-member columns of those rows (``12`` bytes per
member, at most ``G``), so ``G · (3 · itemsize + 12) + 48 · depth`` bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dmlkd.evaluation.knn import DEFAULT_MAX_BYTES, score_chunks, topk_lowest_index

MIN_DEPTH = 16  # a shallow search answers small K directly and leaves fewer rows to count


def chunk_stats(matches: Tensor, positives: Tensor) -> tuple[Tensor, Tensor]:
    """First-hit rank (``k`` when none) and AP@R for a ``(c, k)`` block of neighbour label matches.

    ``k`` must be at least every row's R for AP@R to be complete.
    """
    k = matches.shape[1]
    ranks = torch.arange(1, k + 1, device=matches.device, dtype=torch.float64)
    first_hit = torch.where(matches.any(dim=1), matches.to(torch.int8).argmax(dim=1), k)
    relevant = matches & (ranks.unsqueeze(0) <= positives.unsqueeze(1))
    precision = relevant.cumsum(dim=1).to(torch.float64) / ranks
    ap = (precision * relevant).sum(dim=1) / positives.clamp(min=1)
    return first_hit, ap


def search_depth(ks: list[int], largest_r: int, with_map: bool, available: int) -> int:
    """How many neighbours the shallow search takes: every R for MAP@R, small K answered directly."""
    return max(1, min(available, max(largest_r if with_map else 0, min(max(ks), MIN_DEPTH))))


class ClassMembers:
    """Gallery columns of each class, so a query's positives can be read from its score row.

    ``order`` lists gallery positions grouped by class (ascending position inside a class); ``starts`` and
    ``counts`` locate each class in it. Query and gallery labels share the class ids.
    """

    def __init__(self, query_labels: Tensor, gallery_labels: Tensor):
        num_queries = query_labels.shape[0]
        _, inverse = torch.unique(torch.cat([query_labels, gallery_labels]), return_inverse=True)
        self.query_class = inverse[:num_queries]
        gallery_class = inverse[num_queries:]
        self.order = torch.argsort(gallery_class, stable=True)
        self.counts = torch.bincount(gallery_class, minlength=int(inverse.max()) + 1)
        self.starts = self.counts.cumsum(0) - self.counts

    def positives(self, leave_one_out: bool) -> Tensor:
        """``R`` per query (as ``dmlkd.evaluation.metrics.count_positives``), ``(N,)`` int64."""
        return self.counts[self.query_class] - int(leave_one_out)

    def columns(self, rows: Tensor, leave_one_out: bool) -> tuple[Tensor, Tensor]:
        """``(members, valid)``, each ``(len(rows), width)``: the positives' columns of the given query rows."""
        cls = self.query_class[rows]
        counts = self.counts[cls]
        width = max(1, int(counts.max()))
        offsets = torch.arange(width, device=rows.device)
        valid = offsets.unsqueeze(0) < counts.unsqueeze(1)
        slots = (self.starts[cls].unsqueeze(1) + offsets).clamp_(max=self.order.shape[0] - 1)
        members = self.order[slots]
        if leave_one_out:
            valid &= members != rows.unsqueeze(1)
        return members, valid


def best_positive_ranks(scores: Tensor, members: Tensor, valid: Tensor, work: Tensor) -> Tensor:
    """Rank of each row's best positive (score desc, index asc) by counting, for ``(r, G)`` score rows.

    Every row must have at least one valid member. ``work`` is an ``(≥ r, G)`` float scratch buffer.
    """
    positive_scores = scores.gather(1, members).masked_fill_(~valid, float("-inf"))
    best = positive_scores.max(dim=1, keepdim=True).values
    sentinel = scores.shape[1]
    best_column = torch.where(valid & (positive_scores == best), members, sentinel).min(dim=1, keepdim=True).values
    buffer = work[: scores.shape[0]]
    # Float 0/1 sums are exact up to 2**24 columns and much faster than summing booleans.
    above = torch.gt(scores, best, out=buffer).sum(dim=1)
    equal = torch.eq(scores, best, out=buffer).sum(dim=1)
    ranks = above.long()
    tied = (equal > 1).nonzero().squeeze(1)
    if tied.numel():  # other items share the best positive's score: those at lower columns rank before it
        columns = torch.arange(scores.shape[1], device=scores.device)
        before = (scores[tied] == best[tied]) & (columns.unsqueeze(0) < best_column[tied])
        ranks[tied] += before.sum(dim=1)
    return ranks


def counted_retrieval_stats(
    queries: Tensor,
    query_labels: Tensor,
    gallery: Tensor | None,
    gallery_labels: Tensor,
    positives: Tensor,
    depth: int,
    max_k: int,
    metric: str,
    max_bytes: int | None = None,
    members: ClassMembers | None = None,
) -> tuple[Tensor, Tensor]:
    """``(rank of the best positive, AP@R)`` per query, each ``(N,)``.

    ``queries``/``gallery`` are prepared embeddings (``dmlkd.evaluation.knn.prepare``; ``gallery=None`` for
    leave-one-out); ``positives`` is R per query; ``depth`` the shallow search depth (at least the largest R
    when AP@R is wanted). Ranks are exact below ``max_k``: a query whose best positive is not among its first
    ``depth`` neighbours is counted only when ``max_k > depth``, and otherwise reported at rank ``depth``.
    Queries with R = 0 get rank ``available`` (a miss at every K).
    """
    leave_one_out = gallery is None
    num_gallery = gallery_labels.shape[0]
    available = num_gallery - int(leave_one_out)
    members = ClassMembers(query_labels, gallery_labels) if members is None else members
    budget = DEFAULT_MAX_BYTES if max_bytes is None else int(max_bytes)
    per_row = num_gallery * (3 * queries.element_size() + 12) + 48 * depth
    rows = max(1, budget // per_row)
    first_hit = torch.full((queries.shape[0],), available, dtype=torch.long, device=queries.device)
    ap = torch.zeros(queries.shape[0], dtype=torch.float64, device=queries.device)
    work = None
    for start, scores in score_chunks(queries, gallery, metric, rows):
        if work is None:
            work = torch.empty_like(scores)
        stop = start + scores.shape[0]
        _, indices = topk_lowest_index(scores, depth)
        matches = gallery_labels[indices] == query_labels[start:stop].unsqueeze(1)
        hit, ap[start:stop] = chunk_stats(matches, positives[start:stop])
        found = hit < depth
        first_hit[start:stop] = torch.where(positives[start:stop] > 0, hit, available)
        missing = ((~found) & (positives[start:stop] > 0)).nonzero().squeeze(1)
        if missing.numel() and max_k > depth:
            columns, valid = members.columns(missing + start, leave_one_out)
            first_hit[start + missing] = best_positive_ranks(scores[missing], columns, valid, work)
    return first_hit, ap
