"""The text half of the pipeline report: ``report.md`` and the plain-text summary printed on stdout.

Both render the results dict that ``dmlkd.pipelines.report.write_report`` builds (and writes to
``results.json``); nothing here reads files or runs models.
"""

from __future__ import annotations

import math
from typing import Any

from dmlkd.checkpoints.selection import SELECTION_NOTE
from dmlkd.pipelines.paper import comparison_rows
from dmlkd.pipelines.plots import entry_label

_MODE_NOTES = {
    "online": "the teacher runs on every step on the student's augmented views (the paper's setting)",
    "cached": "the teacher's outputs are replayed from an exact-replay cache of K pre-drawn views per "
    "image (the views the student sees, with a bounded number of distinct views per image)",
    "clean": "the teacher saw only the deterministic eval view of each image, not the student's augmented "
    "view: a **different method** from the paper's, not a like-for-like comparison",
}


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}" if isinstance(value, int | float) and math.isfinite(value) else "–"


def _params(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count >= 100_000 else f"{count / 1e3:.1f}k"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "–"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _run_label(entry: dict[str, Any]) -> str:
    """The entry's name, with its method when the name does not already say it (``teacher (proxy_anchor)``)."""
    label, method = entry_label(entry), entry.get("method")
    return f"{label} ({method})" if method and method not in label else label


def _spec(entry: dict[str, Any]) -> str:
    model = entry.get("model") or {}
    return model.get("spec") or f"{model.get('arch', '?')}-{entry['embedding_dim']}"


def any_marked(results: dict[str, Any]) -> bool:
    """True when some entry has no recorded last-checkpoint metrics (its values carry a † mark)."""
    return any(not entry["last"] for entry in results["entries"])


def summary_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table: last-checkpoint metrics (†: none recorded, evaluated here).

    ``model`` is the architecture spec (``resnet18-128``), ``run`` the entry (and its method), ``mode`` how
    a student saw its teacher (online / cached / clean).
    """
    ks = results["ks"]
    header = [
        "run",
        "model",
        "mode",
        "params",
        *[f"R@{k}" for k in ks],
        "MAP@R",
        "NMI",
        "best/ R@1",
        "img/s",
        "time",
    ]
    rows = []
    for entry in results["entries"]:
        metrics, mark = (entry["last"], "") if entry["last"] else (entry["here"], "†")
        best = entry["best"] or {}
        values = [_pct(metrics.get(key)) + mark for key in [*(f"recall@{k}" for k in ks), "map@r", "nmi"]]
        best_r1 = f"{_pct(best.get('recall@1'))} @{best.get('epoch', '–')}" if best else "–"
        rows.append(
            [
                _run_label(entry),
                _spec(entry),
                entry["teacher_mode"] or "–",
                _params(entry["parameters"]),
                *values,
                best_r1,
                f"{entry['throughput']['images_per_second']:.0f}",
                _duration(entry["train_seconds"]),
            ]
        )
    return header, rows


_TEXT_COLUMNS = 3  # run, model, mode: left-aligned; numbers right-aligned


def _text_table(header: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        cells = [cell.ljust(w) if i < left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return [line(row) for row in [header, *rows]]


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def format_summary(results: dict[str, Any]) -> str:
    """A plain-text summary for stdout: the comparison table and, when published, the paper's numbers."""
    marked = " († evaluated here)" if any_marked(results) else ""
    lines = [
        f"{results['scenario']} on {results['dataset']}: Recall@K ({results['metric']}), MAP@R, NMI in %",
        f"checkpoint: {SELECTION_NOTE['last']}{marked}; best/ R@1 @epoch: {SELECTION_NOTE['best']}, optimistic",
        *_text_table(*summary_rows(results), left=_TEXT_COLUMNS),
    ]
    if results["has_paper"]:
        lines += [
            "",
            "paper (LR README; * probable typo):",
            *_text_table(*comparison_rows(results["entries"])),
        ]
    return "\n".join(lines)


def _best_table(results: dict[str, Any]) -> list[str]:
    keys = [*(f"recall@{k}" for k in results["ks"]), "map@r", "nmi"]
    header = ["model", "epoch", "step", *[f"R@{k}" for k in results["ks"]], "MAP@R", "NMI"]
    rows = [
        [
            entry_label(e),
            str((e["best"] or {}).get("epoch", "–")),
            str((e["best"] or {}).get("step", "–")),
            *[_pct((e["best"] or {}).get(key)) for key in keys],
        ]
        for e in results["entries"]
    ]
    return _markdown_table(header, rows)


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")


def _retrieval_table(results: dict[str, Any]) -> list[str]:
    """The retrieval grid as a table: per query, one row per model (teacher first) with its top-k classes."""
    grid = results.get("retrieval_grid") or {}
    if not grid.get("queries"):
        return []
    header = ["query", "class", "model", *[f"#{rank}" for rank in range(1, grid["neighbours"] + 1)]]
    rows = []
    for query in grid["queries"]:
        for model in query["models"]:
            cells = [f"{'✓' if n['correct'] else '✗'} {_cell(n['class'])}" for n in model["neighbours"]]
            cells += [""] * (grid["neighbours"] - len(cells))
            name, role = model["name"], model["role"]
            who = name if role in name.lower() else f"{name} ({role})"
            rows.append([str(query["query"]), _cell(query["class"]), _cell(who), *cells])
    return _markdown_table(header, rows)


def _notes(results: dict[str, Any]) -> list[str]:
    entries = results["entries"]
    notes = [
        "**last**: the final checkpoint (`last/`) with the metrics recorded at its final evaluation. "
        "**best**: the epoch with the highest Recall@1 **on the test split** (`best/`): selected on test, "
        "hence optimistic (the papers report this selection; there is no validation split).",
        *(
            [
                "†: no last-checkpoint metrics were recorded (e.g. a downloaded checkpoint); the values were "
                "evaluated while writing this report."
            ]
            if any_marked(results)
            else []
        ),
        f"img/s: eval forward without gradients, batch 64 at {results['image_size']} px, median of 5 timed "
        f"batches after 2 warm-up batches, on {results['machine']['device']}.",
        f"Ranking metric: {results['metric']}. The Recall@K curves and the retrieval grid use the test "
        "embeddings of the last checkpoints, computed while writing this report.",
    ]
    for entry in entries:
        recorded, here = (entry["last"] or {}).get("recall@1"), entry["here"].get("recall@1")
        if isinstance(recorded, float) and isinstance(here, float) and abs(recorded - here) > 0.005:
            notes.append(
                f"⚠ {entry['name']}: Recall@1 evaluated here ({_pct(here)}) differs from the recorded "
                f"last value ({_pct(recorded)})."
            )
    for mode in sorted({e["teacher_mode"] for e in entries if e["teacher_mode"]}):
        users = ", ".join(e["name"] for e in entries if e["teacher_mode"] == mode)
        notes.append(f"teacher mode **{mode}** ({users}): {_MODE_NOTES.get(mode, 'see the run config')}.")
    if results["has_paper"]:
        notes.append(
            f"Paper numbers: {results['paper_source']}. The paper ranks its students by Euclidean "
            "distance on the raw embedding and its sources by cosine; all are selected on test."
        )
        notes += [f"\\* {e['name']}: {e['paper']['note']}." for e in entries if e["paper"] and e["paper"]["note"]]
    return [f"- {note}" for note in notes]


def render_markdown(results: dict[str, Any]) -> str:
    """``report.md``: the comparison tables, the notes and the figures (relative links)."""
    machine = results["machine"]
    lines = [
        f"# dmlkd pipeline report: {results['scenario']} on {results['dataset']}",
        "",
        f"torch {machine['torch']}, dmlkd {machine['dmlkd']}, device "
        f"{machine.get('device_name', machine['device'])}, {machine['cpu_count']} CPUs. "
        f"Recall@K ({results['metric']}) with K = {', '.join(map(str, results['ks']))}; values in %.",
        "",
        f"## Results: {SELECTION_NOTE['last']}",
        "",
        *_markdown_table(*summary_rows(results)),
        "",
        f"## Best epoch: {SELECTION_NOTE['best']}, optimistic",
        "",
        *_best_table(results),
        "",
    ]
    if results["has_paper"]:
        lines += [
            "## Compared with the paper",
            "",
            "\\* probable typo in the paper's table.",
            "",
            *_markdown_table(*comparison_rows(results["entries"])),
            "",
        ]
    captions = {
        "recall_per_epoch": "Recall@1 per epoch",
        "recall_at_k": "Recall@K of the last checkpoints",
        "retrieval_grid": "Retrieval examples: the same test queries ranked by "
        f"{', '.join((results.get('retrieval_grid') or {}).get('models') or ['–'])} (green: same class as the "
        "query, red: other class)",
    }
    retrieval = _retrieval_table(results)
    if retrieval:
        lines += [
            "## Retrieval examples (last/ checkpoints)",
            "",
            "The same test queries (position in the test split, class name) ranked by the teacher and by each "
            "student: ✓ same class as the query, ✗ other class.",
            "",
            *retrieval,
            "",
        ]
    lines += ["## Notes", "", *_notes(results), "", "## Figures", ""]
    for key, file_name in results["plots"].items():
        lines += [f"### {captions.get(key, key)}", "", f"![{captions.get(key, key)}]({file_name})", ""]
    return "\n".join(lines)
