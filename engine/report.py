"""Plain-text summaries of a finished run."""

from __future__ import annotations

from dmlkd.engine.loop import FitResult


def summary_table(result: FitResult, metric: str) -> str:
    """Recall@K / MAP@R / NMI of the untrained (if evaluated), last and best-on-test evaluations."""
    from dmlkd.evaluation import format_table

    lines = []
    start = next((h for h in result.history if h["epoch"] == 0), None)
    strip = ("epoch", "step", "eval_seconds")
    if start is not None:
        lines.append("untrained network (epoch 0):")
        lines.append(format_table({k: v for k, v in start.items() if k not in strip}))
    lines.append(f"last (step {result.global_step}, {metric}):")
    lines.append(format_table(result.last))
    if result.best and result.best_epoch is not None:
        lines.append(f"best on the test split (epoch {result.best_epoch}; selected on test, optimistic):")
        lines.append(format_table(result.best))
    lines.append(f"training time: {result.seconds:.1f} s")
    return "\n".join(lines)
