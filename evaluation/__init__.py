"""dmlkd.evaluation: retrieval metrics (Recall@K, MAP@R, NMI), exact memory-bounded kNN, embedding extraction.

Example:
    >>> from dmlkd.evaluation import extract_embeddings, evaluate_embeddings, format_table
    >>> embeddings, labels = extract_embeddings(model, test_loader)      # doctest: +SKIP
    >>> print(format_table(evaluate_embeddings(embeddings, labels, ks=(1, 2, 4, 8))))  # doctest: +SKIP
"""

from dmlkd.evaluation.extract import extract_embeddings, order_by_index
from dmlkd.evaluation.kmeans import kmeans
from dmlkd.evaluation.knn import iter_knn, knn
from dmlkd.evaluation.metrics import (
    evaluate_embeddings,
    format_table,
    map_at_r,
    nmi,
    normalized_mutual_info,
    recall_at_k,
    retrieval_metrics,
)

__all__ = [
    "evaluate_embeddings",
    "extract_embeddings",
    "format_table",
    "iter_knn",
    "kmeans",
    "knn",
    "map_at_r",
    "nmi",
    "normalized_mutual_info",
    "order_by_index",
    "recall_at_k",
    "retrieval_metrics",
]
