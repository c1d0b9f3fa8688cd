"""``dmlkd eval``: Recall@K, MAP@R and NMI of a checkpoint on a test split."""

from __future__ import annotations

import json

import click

from dmlkd.cli.app import main
from dmlkd.cli.options import set_option, shortcut_overrides


@main.command("eval")
@click.argument("ref", required=False, metavar="[REF]")
@click.option(
    "--checkpoint",
    default=None,
    help="Checkpoint or run folder (or give it as REF, like export/embed/hub push). [required]",
)
@click.option("--dataset", default=None, help="Dataset name (see `dmlkd datasets`); default glyphs.")
@click.option("--data-root", default=None, help="Dataset folder (or CSV file for --dataset csv).")
@click.option("--metric", type=click.Choice(["cosine", "euclidean"]), default=None, help="Distance for ranking.")
@click.option("--image-size", type=int, default=None, help="Evaluation crop size (default: the dataset's).")
@click.option("--batch-size", type=int, default=None, help="Images per forward pass.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 or auto (default).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@set_option
def eval_command(
    ref: str | None,
    checkpoint: str | None,
    dataset: str | None,
    data_root: str | None,
    metric: str | None,
    image_size: int | None,
    batch_size: int | None,
    device: str | None,
    as_json: bool,
    overrides: tuple[str, ...],
) -> None:
    """Evaluate a checkpoint: Recall@K, MAP@R and NMI on a dataset's test split.

    REF (or --checkpoint) is a checkpoint folder, an hf://ORG/NAME reference or a run folder; a run folder
    means its last/ (final step; pass RUN/best for best/, selected on the test split), and the output names
    the checkpoint it evaluated (--json: the keys checkpoint, selected, checkpoint_note, epoch, step, metric,
    dataset next to the metrics).

    \b
    Example: dmlkd eval runs/glyphs-teacher --dataset glyphs
    """
    from dmlkd.config.overrides import load_config
    from dmlkd.config.sections import EvalCommandConfig

    if ref and checkpoint and ref != checkpoint:
        raise click.UsageError(f"give the checkpoint once: REF {ref!r} and --checkpoint {checkpoint!r} differ")
    checkpoint = ref or checkpoint
    if not checkpoint:
        raise click.UsageError("Missing argument 'REF' (the checkpoint or run folder to evaluate)")

    shortcuts = {
        "checkpoint": checkpoint,
        "data.name": dataset,
        "data.root": data_root,
        "eval.metric": metric,
        "eval.image_size": image_size,
        "eval.batch_size": batch_size,
        "device": device,
    }
    config = load_config(EvalCommandConfig, {}, shortcut_overrides(shortcuts, overrides))

    from dmlkd.evaluation import format_table
    from dmlkd.evaluation.run import describe_selection, run_eval_command

    results = run_eval_command(config)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    about = ("checkpoint", "selected", "checkpoint_note", "epoch", "step", "metric", "dataset")
    click.echo(format_table({k: v for k, v in results.items() if k not in about}))
    click.echo(describe_selection(results))
