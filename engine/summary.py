"""Plain-text summaries of a finished run."""

from __future__ import annotations

from dmlkd.engine.stage import ENTRY_KEYS, FitResult
from dmlkd.evaluation import format_table


def metrics_table(results: dict[str, float], metric: str) -> str:
    """The primary metrics' table, plus one table per secondary metric (keys ``"<metric>/recall@K"``)."""

    primary = {k: v for k, v in results.items() if "/" not in k and k not in ENTRY_KEYS}
    lines = [f"[{metric}]", format_table(primary)]
    for prefix in sorted({k.split("/", 1)[0] for k in results if "/" in k}):
        extra = {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith(prefix + "/")}
        lines += [f"[{prefix}]", format_table(extra)]
    return "\n".join(lines)


def summary_table(result: FitResult, metric: str) -> str:
    """Recall@K / MAP@R / NMI of the untrained (if evaluated), last and best-on-test evaluations."""
    lines = []
    start = next((h for h in result.history if h["epoch"] == 0), None)
    if start is not None:
        lines += ["untrained network (epoch 0):", metrics_table(start, metric)]
    lines += [f"last (step {result.global_step}):", metrics_table(result.last, metric)]
    if result.best and result.best_epoch is not None:
        lines += [
            f"best on the test split (epoch {result.best_epoch}; selected on test, optimistic):",
            metrics_table(result.best, metric),
        ]
    lines.append(f"training time: {result.seconds:.1f} s")
    return "\n".join(lines)
