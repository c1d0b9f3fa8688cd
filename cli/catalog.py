"""``dmlkd models``, ``dmlkd datasets`` and ``dmlkd recipes``: what can be named on the command line."""

from __future__ import annotations

import json
from typing import Any

import click

from dmlkd.cli.app import main


@main.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--timm", "timm_arch", default=None, metavar="timm/NAME[.TAG]", help="Describe one timm model instead.")
def models_command(as_json: bool, timm_arch: str | None) -> None:
    """List the backbone architectures, their stage taps and input conventions.

    A model is named ARCH-DIM, e.g. resnet50-512 or bn_inception-64, or timm/NAME[.TAG]-DIM.
    """
    from dmlkd.models.catalog import describe_architectures

    if timm_arch is not None:
        from dmlkd.models.catalog import describe_timm_model

        row = describe_timm_model(timm_arch if timm_arch.startswith("timm/") else f"timm/{timm_arch}")
        click.echo(json.dumps(row, indent=2) if as_json else "\n".join(f"{k}: {v}" for k, v in row.items()))
        return
    rows = describe_architectures()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'architecture':<14} {'pooled':>6}  {'stage taps (channels)':<24} input")
    for row in rows:
        taps = ",".join(str(c) for c in row["tap_channels"])
        click.echo(f"{row['arch']:<14} {row['pooled_dim']:>6}  {taps:<24} {row['input']}")
    click.echo("\nModel specs are ARCH-DIM, e.g. resnet50-512, resnet18-128, bn_inception-64.")
    click.echo(
        "timm models (pip install 'dmlkd[timm]'): timm/NAME[.TAG][@REVISION]-DIM, e.g. "
        "timm/mobilenetv3_large_100-128; DIM 0: no head (the pooled feature)."
    )


@main.command("datasets")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def datasets_command(as_json: bool) -> None:
    """List the datasets dmlkd reads, their expected layout and options."""
    from dmlkd.data.catalog import describe_datasets

    rows = describe_datasets()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(f"{row['name']:<8} {row['summary']}")
        if row["options"]:
            click.echo(f"{'':<8} options: {', '.join(row['options'])}")


@main.command("recipes")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def recipes_command(as_json: bool) -> None:
    """List the named presets of both stages (--recipe NAME), one line each."""
    from dmlkd.teacher.config import RECIPES as TEACHER_RECIPES
    from dmlkd.transfer.config import RECIPES as TRANSFER_RECIPES

    rows = [
        {"stage": stage, "name": name, "summary": _recipe_summary(tree, "model" if stage == "teacher" else "student")}
        for stage, recipes in (("teacher", TEACHER_RECIPES), ("transfer", TRANSFER_RECIPES))
        for name, tree in recipes.items()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max(len(row["name"]) for row in rows)
    for row in rows:
        click.echo(f"{row['stage']:<9} {row['name']:<{width}}  {row['summary']}")
    click.echo("\nUse one with `dmlkd teacher train --recipe NAME` or `dmlkd transfer train --recipe NAME`.")


def _recipe_summary(tree: dict[str, Any], model_section: str) -> str:
    model, train, optim = tree.get(model_section, {}), tree.get("train", {}), tree.get("optim", {})
    loss = tree.get("loss", tree.get("method", {})).get("name", "?")
    weights = "ImageNet weights" if model.get("pretrained") else "from scratch"
    batch = f"batch {train.get('batch_size')}" + (f" ({train['ipc']}/class)" if train.get("ipc") else "")
    return (
        f"{model.get('arch')}-{model.get('embedding_dim')} {weights}, {loss}, {tree.get('data', {}).get('name')}, "
        f"{train.get('epochs')} epochs, {batch}, {optim.get('optimizer', 'adamw')} lr {optim.get('lr')}"
    )
