"""Tests of dmlkd.evaluation against brute-force NumPy oracles written here with explicit loops."""

from __future__ import annotations

import logging
import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from dmlkd.data.batch import Batch
from dmlkd.errors import ConfigError, DataError
from dmlkd.evaluation import (
    evaluate_embeddings,
    extract_embeddings,
    format_table,
    kmeans,
    knn,
    map_at_r,
    nmi,
    normalized_mutual_info,
    order_by_index,
    recall_at_k,
    retrieval_metrics,
)
from dmlkd.evaluation import metrics as evaluation_metrics
from dmlkd.evaluation import ranks as ranks_module
from dmlkd.evaluation.knn import chunk_rows
from dmlkd.models.outputs import ModelOutput

# ----------------------------------------------------------------------------------------------- oracles


def oracle_rankings(queries, gallery, metric, leave_one_out):
    """Per query, the gallery positions sorted by (score desc, index asc), the query itself left out."""
    queries = np.asarray(queries, dtype=np.float64)
    gallery = queries if leave_one_out else np.asarray(gallery, dtype=np.float64)
    if metric == "cosine":
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    rankings = []
    for i, query in enumerate(queries):
        scored = []
        for j, item in enumerate(gallery):
            if leave_one_out and j == i:
                continue
            score = float(query @ item) if metric == "cosine" else -float(((query - item) ** 2).sum())
            scored.append((-score, j))
        rankings.append([j for _, j in sorted(scored)])
    return rankings


def oracle_metrics(queries, labels, ks, metric, gallery=None, gallery_labels=None):
    leave_one_out = gallery is None
    labels = np.asarray(labels)
    gallery_labels = labels if leave_one_out else np.asarray(gallery_labels)
    rankings = oracle_rankings(queries, gallery, metric, leave_one_out)
    recall = {}
    for k in ks:
        hits = [any(gallery_labels[j] == labels[i] for j in ranking[:k]) for i, ranking in enumerate(rankings)]
        recall[k] = sum(hits) / len(hits)
    aps = []
    for i, ranking in enumerate(rankings):
        r = sum(1 for j in ranking if gallery_labels[j] == labels[i])
        if r == 0:
            continue
        hits, total = 0, 0.0
        for position, j in enumerate(ranking[:r], start=1):
            if gallery_labels[j] == labels[i]:
                hits += 1
                total += hits / position
        aps.append(total / r)
    return recall, (sum(aps) / len(aps) if aps else math.nan)


# ----------------------------------------------------------------------------------------------- data


def uneven_labels(n, rng):
    """Classes of sizes 1..7, so some are singletons and many are smaller than k."""
    labels, label = [], 0
    while len(labels) < n:
        labels += [label] * int(rng.integers(1, 8))
        label += 1
    return rng.permutation(np.array(labels[:n]))


def make_data(kind, n=90, seed=0):
    """``random`` floats; ``ties``: exactly representable vectors (many exact score ties); ``dups``: ties plus
    exact duplicate rows. Tie data: 4 non-zeros of ±1 in 6 dims, so cosines and squared distances are exact.
    """
    rng = np.random.default_rng(seed)
    labels = uneven_labels(n, rng)
    if kind == "random":
        return rng.standard_normal((n, 8)).astype(np.float32), labels
    x = np.zeros((n, 6), dtype=np.float32)
    for row in x:
        row[rng.choice(6, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    if kind == "dups":
        x[n // 2 :] = x[: n - n // 2]
        labels[n // 2 :] = rng.choice([labels[: n - n // 2], labels[rng.permutation(n - n // 2)]][seed % 2])
    return x, labels


# ----------------------------------------------------------------------------------------------- kNN


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("kind", ["random", "ties", "dups"])
@pytest.mark.parametrize("rows_per_chunk", [1, 7, None])
def test_knn_equals_bruteforce_including_tie_order(metric, kind, rows_per_chunk):
    x, _ = make_data(kind)
    k = 12
    max_bytes = None if rows_per_chunk is None else rows_per_chunk * (len(x) * 20 + 48 * k)
    if max_bytes is not None:
        assert chunk_rows(len(x), k, 4, max_bytes) == rows_per_chunk
    _, indices = knn(torch.from_numpy(x), None, k, metric=metric, max_bytes=max_bytes)
    expected = [ranking[:k] for ranking in oracle_rankings(x, None, metric, True)]
    assert indices.tolist() == expected


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_knn_query_gallery_equals_bruteforce(metric):
    x, _ = make_data("dups", n=120, seed=1)
    queries, gallery = x[:30], x[30:]
    _, indices = knn(queries, gallery, 20, metric=metric, max_bytes=3 * (90 * 20 + 48 * 20))
    assert indices.tolist() == [ranking[:20] for ranking in oracle_rankings(queries, gallery, metric, False)]


def test_self_is_excluded_by_index_not_by_first_column():
    x = np.repeat(np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32), 2, axis=0)
    twins = np.arange(20) ^ 1  # row 2i and 2i+1 are identical
    _, indices = knn(x, None, 1, metric="euclidean")
    assert indices[:, 0].tolist() == twins.tolist()
    # Twins with different labels: dropping "the first column" could keep the query itself and score 100%.
    labels = np.arange(20)
    assert recall_at_k(x, labels, ks=(1,))[1] == 0.0


# ----------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("kind", ["random", "ties", "dups"])
def test_recall_and_map_equal_bruteforce_leave_one_out(metric, kind):
    x, labels = make_data(kind, seed=2)
    ks = (1, 2, 4, 8, 16)
    expected_recall, expected_map = oracle_metrics(x, labels, ks, metric)
    for max_bytes in (None, 2000, 50_000):
        recall = recall_at_k(torch.from_numpy(x), torch.from_numpy(labels), ks, metric=metric, max_bytes=max_bytes)
        assert recall == pytest.approx(expected_recall, abs=1e-12)
        assert map_at_r(x, labels, metric=metric, max_bytes=max_bytes) == pytest.approx(expected_map, abs=1e-12)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("kind", ["random", "dups"])
def test_recall_and_map_equal_bruteforce_query_gallery(metric, kind):
    x, labels = make_data(kind, n=120, seed=3)
    queries, gallery = x[:40], x[40:]
    ks = (1, 3, 10)
    expected_recall, expected_map = oracle_metrics(queries, labels[:40], ks, metric, gallery, labels[40:])
    recall = recall_at_k(queries, labels[:40], ks, metric, gallery=gallery, gallery_labels=labels[40:])
    assert recall == pytest.approx(expected_recall, abs=1e-12)
    value = map_at_r(queries, labels[:40], metric, gallery=gallery, gallery_labels=labels[40:], max_bytes=5000)
    assert value == pytest.approx(expected_map, abs=1e-12)


def test_map_at_r_divides_by_r_and_singletons_are_recall_misses():
    # 1-D points; query 0 (class 0, R = 2) ranks: 1 (class 0), 2 (class 1), 3 (class 0).
    x = np.array([[0.0], [1.0], [2.0], [3.0], [100.0]], dtype=np.float32)
    labels = np.array([0, 0, 1, 0, 7])
    queries, query_labels = x[:1], labels[:1]
    value = map_at_r(queries, query_labels, "euclidean", gallery=x[1:], gallery_labels=labels[1:])
    assert value == pytest.approx(0.5)  # (1/R)·P(1) = 1/2; dividing by the hits (DC) would give 1.0
    recall = recall_at_k(x, labels, ks=(1, 4), metric="euclidean")
    # Leave-one-out: item 4 (class 7) is a singleton and counts as a miss; item 2 (class 1) too.
    assert recall[1] == pytest.approx(2 / 5) and recall[4] == pytest.approx(3 / 5)
    # MAP@R excludes R = 0 queries: only the three class-0 items count.
    expected = oracle_metrics(x, labels, (1,), "euclidean")[1]
    assert map_at_r(x, labels, metric="euclidean") == pytest.approx(expected)


def test_search_depth_is_largest_class_or_small_k_never_max_k(monkeypatch):
    requested = []
    original = ranks_module.topk_lowest_index

    def spy(scores, k):
        requested.append(k)
        return original(scores, k)

    monkeypatch.setattr(ranks_module, "topk_lowest_index", spy)
    labels = np.arange(300) // 3
    labels[:9] = 0  # largest class: 9 items, so R ≤ 8
    x = np.random.default_rng(0).standard_normal((300, 4)).astype(np.float32)
    map_at_r(x, labels)
    recall_at_k(x, labels, ks=(1, 4))
    # Recall@100 is counted, not searched: the shallow search stays at max(largest R, 16) neighbours.
    recall_at_k(x, labels, ks=(1, 100))
    map_at_r(x, labels, gallery=x[:200], gallery_labels=labels[:200], metric="euclidean")
    assert requested == [8, 4, 16, 9]


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("kind", ["random", "ties", "dups"])
@pytest.mark.parametrize("min_depth", [1, 16])
def test_counted_ranks_equal_bruteforce_beyond_the_search_depth(monkeypatch, metric, kind, min_depth):
    # Small search depths leave most best positives to the counting path (ties included).
    monkeypatch.setattr(ranks_module, "MIN_DEPTH", min_depth)
    x, labels = make_data(kind, n=100, seed=5)
    ks = (1, 2, 3, 5, 10, 20, 40, 99)
    expected_recall, expected_map = oracle_metrics(x, labels, ks, metric)
    for max_bytes in (None, 100 * (100 * 24 + 48 * 16) // 7):  # one chunk, and chunks of 7 rows
        recall, value = retrieval_metrics(x, labels, ks, metric, max_bytes=max_bytes)
        assert recall == pytest.approx(expected_recall, abs=1e-12)
        assert value == pytest.approx(expected_map, abs=1e-12)
    queries, gallery = x[:30], x[30:]  # query -> gallery, as In-shop: nothing is excluded
    expected_recall, expected_map = oracle_metrics(queries, labels[:30], ks[:-1], metric, gallery, labels[30:])
    recall, value = retrieval_metrics(
        queries, labels[:30], ks[:-1], metric, gallery, labels[30:], max_bytes=4 * (70 * 24 + 48 * 16)
    )
    assert recall == pytest.approx(expected_recall, abs=1e-12)
    assert value == pytest.approx(expected_map, abs=1e-12)


def test_counted_ranks_break_ties_with_the_best_positive_by_index():
    # Every candidate ties with every other (identical vectors): the rank of a query's best positive is the
    # number of lower-indexed candidates, so Recall@K depends only on where the positives sit.
    x = np.ones((12, 3), dtype=np.float32)
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 0])
    ks = (1, 2, 5, 11)
    expected_recall, expected_map = oracle_metrics(x, labels, ks, "cosine")
    recall, value = retrieval_metrics(x, labels, ks, "cosine")
    assert recall == pytest.approx(expected_recall, abs=1e-12)
    assert value == pytest.approx(expected_map, abs=1e-12)
    # Item 0's only positive is item 11, after 10 tied others: a miss at K = 5, a hit at K = 11.
    assert expected_recall[5] < expected_recall[11]


def test_k_larger_than_candidates_uses_all_of_them(caplog):
    x, labels = make_data("random", n=10)
    with caplog.at_level(logging.WARNING):
        recall = recall_at_k(x, labels, ks=(1, 100))
    assert "exceeds" in caplog.text
    assert recall[100] == pytest.approx(float(np.mean([np.sum(labels == label) > 1 for label in labels])))


def test_user_errors_are_one_line_dmlkd_errors(monkeypatch):
    x, labels = make_data("random", n=20)
    with pytest.raises(ConfigError, match="cosine, euclidean"):
        recall_at_k(x, labels, ks=(1,), metric="manhattan")
    with pytest.raises(ConfigError, match="auto, faiss, torch"):
        recall_at_k(x, labels, ks=(1,), backend="annoy")
    with pytest.raises(ConfigError, match="positive"):
        recall_at_k(x, labels, ks=(0,))
    with pytest.raises(DataError, match="shape"):
        recall_at_k(x, labels[:5], ks=(1,))
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        map_at_r(bad, labels)
    with pytest.raises(ConfigError, match="together"):
        map_at_r(x, labels, gallery=x)
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes ``import faiss`` fail
    with pytest.raises(ConfigError, match=r'pip install "dmlkd\[faiss\]"') as error:
        recall_at_k(x, labels, ks=(1,), backend="faiss")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_faiss_backend_equals_torch_backend(metric):
    pytest.importorskip("faiss")
    x, labels = make_data("random", n=400, seed=4)
    centres = np.random.default_rng(5).standard_normal((labels.max() + 1, 8)).astype(np.float32)
    x = x + 2 * centres[labels]  # class structure, so the metrics are far from 0
    ks = (1, 2, 4, 8)
    for gallery_args in ({}, {"gallery": x[100:], "gallery_labels": labels[100:]}):
        queries, query_labels = (x, labels) if not gallery_args else (x[:100], labels[:100])
        results = [
            evaluate_embeddings(
                queries,
                query_labels,
                ks,
                metric,
                compute_nmi=False,
                backend=backend,
                max_bytes=20_000,
                **gallery_args,
            )
            for backend in ("torch", "faiss")
        ]
        assert results[0] == pytest.approx(results[1], abs=1e-12)
        assert results[0]["recall@1"] > 0.2
        gallery = gallery_args.get("gallery")
        assert torch.equal(knn(queries, gallery, 8, metric, "torch")[1], knn(queries, gallery, 8, metric, "faiss")[1])


# ----------------------------------------------------------------------------------------------- NMI


def scipy_nmi(a, b):
    from scipy.stats import entropy
    from scipy.stats.contingency import crosstab

    table = crosstab(a, b).count.astype(np.float64)
    n = table.sum()
    joint = table / n
    outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / outer[nz])).sum())
    return mi / ((entropy(table.sum(1)) + entropy(table.sum(0))) / 2)


def test_normalized_mutual_info_matches_the_formula():
    pytest.importorskip("scipy")
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.integers(0, 7, 300)
        b = np.where(rng.random(300) < 0.6, a, rng.integers(0, 5, 300)) * 3 - 4  # arbitrary label values
        assert normalized_mutual_info(a, b) == pytest.approx(scipy_nmi(a, b), rel=1e-12)
    perfect = rng.integers(0, 10, 200)
    assert normalized_mutual_info(perfect, (perfect * 7 + 3) % 10) == pytest.approx(1.0)
    assert normalized_mutual_info(rng.integers(0, 3, 20000), rng.integers(0, 3, 20000)) < 1e-3
    assert normalized_mutual_info(np.zeros(5), np.zeros(5)) == 1.0
    assert normalized_mutual_info(np.zeros(6), np.arange(6) % 2) == 0.0


def test_normalized_mutual_info_matches_sklearn_if_installed():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 12, 500), rng.integers(0, 9, 500)
    b[:250] = a[:250]
    assert normalized_mutual_info(a, b) == pytest.approx(metrics.normalized_mutual_info_score(a, b), rel=1e-10)


def blobs(num_classes=6, per_class=30, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_classes, 16)) * 20
    labels = np.repeat(np.arange(num_classes), per_class)
    return (centres[labels] + rng.standard_normal((len(labels), 16))).astype(np.float32), labels


def test_torch_kmeans_finds_well_separated_clusters_deterministically():
    x, labels = blobs()
    clusters = kmeans(torch.from_numpy(x), 6, seed=3)
    assert normalized_mutual_info(labels, clusters) == pytest.approx(1.0)
    assert torch.equal(clusters, kmeans(torch.from_numpy(x), 6, seed=3))
    assert nmi(x, labels, seed=0) == pytest.approx(1.0)
    noise = np.random.default_rng(1).standard_normal((3000, 4)).astype(np.float32)
    assert nmi(noise, np.arange(3000) % 3) < 0.01


def test_torch_kmeans_survives_duplicate_points_and_chunking():
    x = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]]).repeat(10, 1)
    clusters = kmeans(x, 3, seed=0, max_bytes=64)
    assert normalized_mutual_info(torch.arange(30) % 3, clusters) == pytest.approx(1.0)


def test_faiss_kmeans_backend():
    pytest.importorskip("faiss")
    x, labels = blobs(num_classes=4, per_class=50)
    assert nmi(x, labels, backend="faiss") == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------- evaluate + table


def test_evaluate_embeddings_keys_and_values():
    x, labels = blobs()
    results = evaluate_embeddings(torch.from_numpy(x), torch.from_numpy(labels), ks=(1, 2), metric="euclidean")
    assert list(results) == ["recall@1", "recall@2", "map@r", "nmi"]
    assert results == pytest.approx({"recall@1": 1.0, "recall@2": 1.0, "map@r": 1.0, "nmi": 1.0})
    shifted = evaluate_embeddings(x[::2], labels[::2], ks=(1,), gallery=x[1::2], gallery_labels=labels[1::2])
    assert shifted == pytest.approx({"recall@1": 1.0, "map@r": 1.0, "nmi": 1.0})
    assert "nmi" not in evaluate_embeddings(x, labels, ks=(1,), compute_nmi=False)


def test_format_table_is_aligned_percentages():
    table = format_table({"recall@10": 0.5, "recall@1": 0.6523, "nmi": 0.68712, "map@r": 0.2412, "epoch": 3})
    header, row = table.splitlines()
    assert header.split() == ["R@1", "R@10", "MAP@R", "NMI", "epoch"]
    assert row.split() == ["65.2", "50.0", "24.1", "68.7", "3"]
    assert len(header) == len(row)


# ----------------------------------------------------------------------------------------------- extraction


class FakeEmbedder(nn.Module):
    """Embeds an image as [mean, index-encoding pixel], then BatchNorm (to check train/eval restoring)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.norm = nn.BatchNorm1d(2)

    def forward(self, images):
        assert not self.training, "extract_embeddings must run the model in eval mode"
        features = torch.stack([images.mean(dim=(1, 2, 3)), images[:, 0, 0, 0]], dim=1) * self.scale
        return ModelOutput(embedding=self.norm(features), pooled=features)


class ListLoader(list):
    def __init__(self, batches, dataset_size):
        super().__init__(batches)
        self.dataset = range(dataset_size)


def shuffled_batches(n=23, batch_size=5, seed=0, as_tuples=False):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    images = torch.zeros(n, 3, 4, 4)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)
    labels = torch.arange(n) // 3
    batches = []
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        batch = (images[idx], labels[idx], idx)
        batches.append(batch if as_tuples else Batch(*batch))
    return batches


@pytest.mark.parametrize("as_tuples", [False, True])
def test_extract_embeddings_restores_dataset_order_and_modes(as_tuples):
    model = FakeEmbedder().train()
    model.norm.eval()  # a frozen BN inside a training model must stay frozen afterwards
    embeddings, labels = extract_embeddings(
        model, ListLoader(shuffled_batches(as_tuples=as_tuples), 23), progress=False
    )
    assert torch.equal(labels, torch.arange(23) // 3)
    assert torch.allclose(embeddings[:, 1], torch.arange(23, dtype=torch.float32), atol=1e-4)
    assert model.training and not model.norm.training


def test_extract_embeddings_detects_missing_and_duplicate_samples():
    batches = shuffled_batches()
    with pytest.raises(DataError, match="never embedded"):
        extract_embeddings(FakeEmbedder(), ListLoader(batches[1:], 23), progress=False)
    with pytest.raises(DataError, match="more than once"):
        extract_embeddings(FakeEmbedder(), ListLoader([*batches, batches[0]], 23), progress=False)
    with pytest.raises(DataError, match="Batch"):
        extract_embeddings(FakeEmbedder(), [torch.zeros(2, 3, 4, 4)], progress=False)


def test_order_by_index_drops_padding_duplicates_for_distributed_gathers():
    embeddings = torch.arange(12, dtype=torch.float32).view(6, 2)
    indices = torch.tensor([2, 0, 3, 1, 2, 0])  # two ranks, last batch padded with repeats
    labels = torch.tensor([20, 0, 30, 10, 20, 0])
    ordered, ordered_labels = order_by_index(embeddings, labels, indices, 4, duplicates="drop")
    assert ordered_labels.tolist() == [0, 10, 20, 30]
    assert torch.equal(ordered, embeddings[[1, 3, 0, 2]])
    with pytest.raises(DataError, match="different labels"):
        order_by_index(embeddings, torch.tensor([20, 0, 30, 10, 21, 0]), indices, 4, duplicates="drop")


def test_nmi_seeds_large_k_randomly_and_small_k_with_kmeans_plus_plus(monkeypatch):
    inits = []
    original = evaluation_metrics.kmeans

    def spy(*args, **kwargs):
        inits.append(kwargs["init"])
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluation_metrics, "kmeans", spy)
    monkeypatch.setattr(evaluation_metrics, "KMEANS_PP_MAX_CLUSTERS", 5)
    x = np.random.default_rng(0).standard_normal((60, 4)).astype(np.float32)
    nmi(x, np.arange(60) % 5)
    nmi(x, np.arange(60) % 6)
    assert inits == ["k-means++", "random"]


def test_random_init_kmeans_is_deterministic_and_bounded_by_niter_and_tol():
    centres = np.eye(8, dtype=np.float32) * 20
    x = torch.from_numpy(np.repeat(centres, 30, axis=0) + np.random.default_rng(1).standard_normal((240, 8)))
    info: dict = {}
    first = kmeans(x.float(), 8, seed=4, init="random", info=info)
    assert torch.equal(first, kmeans(x.float(), 8, seed=4, init="random"))
    assert 1 <= info["iterations"] <= 100 and info["changed"] == 0
    capped: dict = {}
    kmeans(x.float(), 8, seed=4, init="random", niter=1, info=capped)
    assert capped["iterations"] == 1
    loose: dict = {}
    kmeans(x.float(), 8, seed=4, init="random", tol=1.0, info=loose)  # any change is small enough: stop at once
    assert loose["iterations"] == 2
    with pytest.raises(ValueError, match="k-means\\+\\+, random"):
        kmeans(x.float(), 8, init="forgy")
