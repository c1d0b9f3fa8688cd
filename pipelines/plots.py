"""The report's PNG figures: the curves drawn with matplotlib's object API on the Agg canvas (no pyplot, no
window), the retrieval grid by ``dmlkd.pipelines.grid_image``.

The ``plot_*`` functions take plain data (histories, recall curves, neighbour indices), write one PNG and
return its path, so the figures can be tested without any model; ``write_plots`` draws the report's three
figures from its results and the test embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dmlkd.config.sections import EvalConfig
from dmlkd.data.base import DatasetSplits
from dmlkd.pipelines.grid_image import GridRow, plot_retrieval_grid

if TYPE_CHECKING:  # torch is not needed to print a finished pipeline's summary
    from torch import Tensor

FILES = {
    "recall_per_epoch": "recall_per_epoch.png",
    "recall_at_k": "recall_at_k.png",
    "retrieval_grid": "retrieval_grid.png",
}
GRID_QUERIES = 6
GRID_NEIGHBOURS = 5
DPI = 100


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def plot_recall_per_epoch(
    histories: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, key: str = "recall@1"
) -> Path:
    """One line per run: ``key`` (a fraction, drawn in percent) against the epoch of each evaluation.

    Args:
        histories: ``{label: metrics.jsonl rows}``; rows without ``key`` are skipped, and a run without any
            row is listed in the figure as "no per-epoch metrics".
        path: the PNG to write.
        key: the metric to draw (default Recall@1).
    """
    figure = _figure(8, 5)
    axes = figure.add_subplot()
    missing = []
    for label, rows in histories.items():
        points = [(row["epoch"], 100 * row[key]) for row in rows if key in row and "epoch" in row]
        if not points:
            missing.append(label)
            continue
        epochs, values = zip(*sorted(points))
        (line,) = axes.plot(epochs, values, marker="o", markersize=3, label=label)
        best = max(range(len(values)), key=lambda i: values[i])
        axes.plot([epochs[best]], [values[best]], marker="*", markersize=10, color=line.get_color())
    if missing:
        axes.text(
            0.01,
            0.01,
            "no per-epoch metrics: " + ", ".join(missing),
            transform=axes.transAxes,
            fontsize=8,
            color="gray",
        )
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_xlabel("epoch")
    axes.set_ylabel(f"{_label(key)} (%) on the test split")
    axes.set_title(f"{_label(key)} per epoch (star: best epoch, selected on test)")
    axes.grid(True, alpha=0.3)
    if len(missing) < len(histories):
        axes.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def plot_recall_at_k(curves: Mapping[str, Mapping[int, float]], path: Path, marked_ks: Sequence[int] = ()) -> Path:
    """Recall@K (fractions, drawn in percent) against K on a log axis, one line per model.

    Args:
        curves: ``{label: {K: recall}}``.
        path: the PNG to write.
        marked_ks: K values to mark with vertical lines (the dataset's reported K values).
    """
    figure = _figure(8, 5)
    axes = figure.add_subplot()
    for label, curve in curves.items():
        ks = sorted(curve)
        axes.plot(ks, [100 * curve[k] for k in ks], marker="o", markersize=3, label=label)
    all_ks = sorted({k for curve in curves.values() for k in curve})
    if all_ks and all_ks[-1] > all_ks[0]:
        axes.set_xscale("log", base=2)
        ticks = sorted(set(_ticks(marked_ks)) & set(all_ks)) or all_ks
        axes.set_xticks(ticks, [str(k) for k in ticks])
        axes.minorticks_off()
    for k in marked_ks:
        axes.axvline(k, color="gray", alpha=0.25, linewidth=1)
    axes.set_xlabel("K")
    axes.set_ylabel("Recall@K (%) on the test split")
    axes.set_title("Recall@K of the last checkpoints")
    axes.grid(True, alpha=0.3)
    if curves:
        axes.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def _ticks(marked_ks: Sequence[int]) -> list[int]:
    """Powers of two up to 32, or the marked K values and 32 when they go beyond (SOP: 1, 10, 100, 1000)."""
    if any(k > 32 for k in marked_ks):
        return [*marked_ks, 32]
    return [1, 2, 4, 8, 16, 32, *marked_ks]


def _label(key: str) -> str:
    if key.startswith("recall@"):
        return "Recall@" + key.split("@", 1)[1]
    return key


@dataclass
class ModelEmbeddings:
    """Test-split embeddings of one model: ``(N, D)`` queries and ``(N,)`` labels; ``gallery`` is None for
    leave-one-out retrieval, else the ``(G, D)`` gallery and ``(G,)`` labels."""

    query: Tensor
    query_labels: Tensor
    gallery: Tensor | None = None
    gallery_labels: Tensor | None = None


def entry_label(entry: Mapping[str, Any]) -> str:
    """How a report entry is named in figures and tables."""
    name = entry["name"]
    return name if entry["role"] == "student" or "teacher" in name.lower() else f"{name} (teacher)"


def grid_queries(embedded: ModelEmbeddings, eval_config: EvalConfig, num_queries: int = GRID_QUERIES) -> list[int]:
    """The query positions of the retrieval grid, drawn with ``eval_config.seed`` (the same for every model)."""
    count = embedded.query.shape[0]
    chosen = np.random.default_rng(eval_config.seed).choice(count, size=min(num_queries, count), replace=False)
    return [int(position) for position in chosen.tolist()]


def grid_rows(
    embedded: ModelEmbeddings,
    eval_config: EvalConfig,
    num_queries: int = GRID_QUERIES,
    num_neighbours: int = GRID_NEIGHBOURS,
    queries: Sequence[int] | None = None,
) -> list[GridRow]:
    """``num_queries`` queries drawn with ``eval_config.seed`` (or the given ``queries``) and their nearest
    neighbours (self excluded by index, so an exact duplicate of the query still shows up as a neighbour)."""
    from dmlkd.evaluation import knn

    leave_one_out = embedded.gallery is None
    gallery = embedded.query if leave_one_out else embedded.gallery
    gallery_labels = embedded.query_labels if leave_one_out else embedded.gallery_labels
    chosen = list(queries) if queries is not None else grid_queries(embedded, eval_config, num_queries)
    k = min(num_neighbours + int(leave_one_out), gallery.shape[0])
    _, indices = knn(embedded.query[chosen], gallery, k, metric=eval_config.metric, backend=eval_config.backend)
    rows = []
    for query, neighbours in zip(chosen, indices.tolist()):
        neighbours = [n for n in neighbours if not (leave_one_out and n == query)][:num_neighbours]
        rows.append(
            GridRow(
                query,
                int(embedded.query_labels[query]),
                neighbours,
                [int(gallery_labels[n]) for n in neighbours],
            )
        )
    return rows


def grid_order(entries: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The models of the retrieval grid: the teacher(s) first, then every student, in report order."""
    return [e for e in entries if e["role"] == "teacher"] + [e for e in entries if e["role"] != "teacher"]


def retrieval_comparison(
    entries: Sequence[Mapping[str, Any]],
    embedded: Mapping[str, ModelEmbeddings],
    eval_config: EvalConfig,
    class_name: Callable[[int], str] = str,
    num_queries: int = GRID_QUERIES,
    num_neighbours: int = GRID_NEIGHBOURS,
) -> dict[str, Any]:
    """The same test queries ranked by every model (teacher first): JSON-ready ``{"queries": [{"query",
    "label", "class", "models": [{"name", "role", "neighbours": [{"rank", "index", "label", "class",
    "correct"}]}]}]}``; ``index`` is the position in the gallery (the test split for leave-one-out)."""
    models = grid_order(entries)
    if not models:
        return {"queries": [], "models": [], "neighbours": num_neighbours}
    queries = grid_queries(embedded[models[0]["name"]], eval_config, num_queries)
    ranked = {
        e["name"]: grid_rows(embedded[e["name"]], eval_config, num_neighbours=num_neighbours, queries=queries)
        for e in models
    }
    rows = []
    for i, query in enumerate(queries):
        first = ranked[models[0]["name"]][i]
        per_model = []
        for entry in models:
            row = ranked[entry["name"]][i]
            per_model.append(
                {
                    "name": entry["name"],
                    "role": entry["role"],
                    "neighbours": [
                        {
                            "rank": rank,
                            "index": index,
                            "label": label,
                            "class": class_name(label),
                            "correct": label == row.query_label,
                        }
                        for rank, (index, label) in enumerate(zip(row.neighbours, row.neighbour_labels), start=1)
                    ],
                }
            )
        rows.append(
            {"query": query, "label": first.query_label, "class": class_name(first.query_label), "models": per_model}
        )
    return {"queries": rows, "models": [e["name"] for e in models], "neighbours": num_neighbours}


def write_plots(
    out_dir: Path,
    results: dict[str, Any],
    splits: DatasetSplits,
    embedded: Mapping[str, ModelEmbeddings],
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    eval_config: EvalConfig,
) -> dict[str, str]:
    """Draw the report's three figures into ``out_dir``; returns ``{figure: file name}``.

    Sets ``results["retrieval_grid"]``: the same test queries with the top-k neighbours of the teacher and
    of each student (class names where the dataset has them), which the grid draws row by row.
    """
    entries = results["entries"]
    plot_recall_per_epoch({entry_label(e): histories[e["name"]] for e in entries}, out_dir / FILES["recall_per_epoch"])
    curves = {entry_label(e): {int(k): v for k, v in e["recall_curve"].items()} for e in entries}
    plot_recall_at_k(curves, out_dir / FILES["recall_at_k"], marked_ks=results["ks"])
    query_gallery = splits.query is not None and splits.gallery is not None
    query_side = splits.query if query_gallery else splits.test
    gallery_side = splits.gallery if query_gallery else splits.test
    comparison = retrieval_comparison(entries, embedded, eval_config, query_side.class_name)
    results["retrieval_grid"] = comparison
    rows, labels = [], []
    for query in comparison["queries"]:
        for model in query["models"]:
            neighbours = model["neighbours"]
            rows.append(
                GridRow(
                    query["query"], query["label"], [n["index"] for n in neighbours], [n["label"] for n in neighbours]
                )
            )
            labels.append(model["name"])
    title = (
        f"top-{GRID_NEIGHBOURS} neighbours of the same test queries by {', '.join(comparison['models'])} "
        "(last/ checkpoints)"
        if comparison["models"]
        else ""
    )
    plot_retrieval_grid(
        rows,
        query_side.load,
        gallery_side.load,
        out_dir / FILES["retrieval_grid"],
        title,
        class_name=query_side.class_name,
        row_labels=labels,
    )
    return dict(FILES)
