"""``dmlkd transfer train`` and ``dmlkd cache build`` (torch is imported only when a command runs)."""

from __future__ import annotations

import json
from typing import Any

import click

SET_HELP = "Override any config field, e.g. --set method.kwargs.sigma=0.5 (repeatable)."


def _items(shortcuts: dict[str, Any], overrides: tuple[str, ...]) -> list[str]:
    return [*(f"{k}={json.dumps(v)}" for k, v in shortcuts.items() if v is not None), *overrides]


def _common_options(function: Any) -> Any:
    options = [
        click.option("--teacher", "teacher_ref", default=None, help="Teacher run or checkpoint folder."),
        click.option("--student", "student_spec", default=None, help="ARCH-DIM of the student, e.g. resnet18-128."),
        click.option("--dataset", default=None, help="Dataset name (see `dmlkd datasets`); default glyphs."),
        click.option("--data-root", default=None, help="Dataset folder (or CSV file)."),
        click.option(
            "--transfer-set",
            default=None,
            help="Train on this folder of unlabeled images (recursive) instead of the dataset's train split; "
            "label-free methods only, random batches; --dataset still gives the test split.",
        ),
        click.option("--recipe", default=None, help="Named preset: lr-cub, lr-cars, lr-sop, demo-glyphs."),
        click.option(
            "--teacher-mode",
            type=click.Choice(["auto", "online", "cached", "clean"]),
            default=None,
            help="online: teacher on every step (default); cached: exact-replay cache of K views per image; "
            "clean: one centre-crop view per image (a different, cheaper method).",
        ),
        click.option("--cache-views", type=int, default=None, help="K pre-drawn views per image in the cache."),
        click.option(
            "--cache-refresh-epochs",
            type=int,
            default=None,
            help="Re-draw the K cached views every E epochs (more view diversity; K*N teacher passes per E).",
        ),
        click.option("--epochs", type=int, default=None),
        click.option("--max-steps", type=int, default=None, help="Stop after N optimiser steps."),
        click.option("--batch-size", type=int, default=None, help="Distinct images per step (before views)."),
        click.option("--ipc", type=int, default=None, help="Images per class in a batch (P x K sampling)."),
        click.option("--views", type=int, default=None, help="Augmented views per image (the reference: 2)."),
        click.option("--image-size", type=int, default=None),
        click.option("--lr", type=float, default=None),
        click.option("--seed", type=int, default=None),
        click.option("--pretrained/--no-pretrained", default=None, help="Student from ImageNet weights."),
        click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default=None),
        click.option("--num-workers", type=int, default=None),
        click.option("--eval-every", type=int, default=None),
        click.option("--save-every", type=int, default=None, help="Save a resumable state every N optimiser steps."),
        click.option("--deterministic", is_flag=True, default=None, help="Deterministic algorithms (slower on GPUs)."),
        click.option("--device", default=None, help="auto (default), cpu, cuda or cuda:N."),
        click.option("--no-progress", is_flag=True, help="No progress bars."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def build_config_tree(params: dict[str, Any], method: str | None) -> tuple[list[str], dict[str, Any]]:
    """The ``--set`` items from the shortcut flags and the resulting config tree (validated later)."""
    from dmlkd.config import apply_overrides
    from dmlkd.models.spec import parse_spec
    from dmlkd.transfer.config import start_tree

    spec = parse_spec(params["student_spec"]) if params["student_spec"] else None
    shortcuts = {
        "teacher.ref": params["teacher_ref"],
        "teacher.mode": params["teacher_mode"],
        "teacher.cache_views": params["cache_views"],
        "teacher.cache_refresh_epochs": params.get("cache_refresh_epochs"),
        "student.arch": spec.arch if spec else None,
        "student.embedding_dim": spec.dim if spec else None,
        "method.name": method,
        "data.name": params["dataset"],
        "data.root": params["data_root"],
        "train.epochs": params["epochs"],
        "train.max_steps": params["max_steps"],
        "train.batch_size": params["batch_size"],
        "train.ipc": params["ipc"],
        "train.views": params["views"],
        "train.image_size": params["image_size"],
        "optim.lr": params["lr"],
        "train.seed": params["seed"],
        "student.pretrained": params["pretrained"],
        "train.mixed_precision": params["mixed_precision"],
        "train.num_workers": params["num_workers"],
        "train.eval_every": params["eval_every"],
        "train.device": params["device"],
        "train.save_every": params["save_every"],
        "train.deterministic": params["deterministic"] or None,
        "train.progress": False if params["no_progress"] else None,
    }
    items = _items(shortcuts, params["overrides"])
    if params["transfer_set"] is not None:
        # No classes to sample P x K from: random batches, unless --ipc asks otherwise (then an error says why).
        items = [f"transfer_set={json.dumps(params['transfer_set'])}", "train.ipc=null", *items]
        if params["ipc"] is not None:
            items.append(f"train.ipc={params['ipc']}")
    start = start_tree(params["recipe"], params["dataset"])
    tree = apply_overrides(start, items)
    if tree["method"]["name"] != start["method"]["name"]:
        # The recipe's options belong to its own method: another method keeps only the options given here.
        tree["method"]["kwargs"] = apply_overrides({}, items).get("method", {}).get("kwargs", {})
    return items, tree


@click.group("transfer")
def transfer_group() -> None:
    """Stage 2: distil a teacher's embedding space into a student."""


@transfer_group.command("train")
@click.option(
    "--method",
    default=None,
    help="relaxed_contrastive (default), relaxed_ms, rkd, pkt, darkrank, fitnet, attention or crd.",
)
@click.option("--out", required=True, help="Run folder to create (or resume).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last saved step.")
@click.option("--overwrite", is_flag=True, help="Replace a run already in --out.")
@_common_options
def train_command(method: str | None, out: str, resume: bool, overwrite: bool, **params: Any) -> None:
    """Train a student against a frozen teacher; last/ and best/ checkpoints go to --out.

    Example: dmlkd transfer train --teacher runs/cub-r50 --student resnet18-128 --method relaxed_contrastive
    --dataset cub --data-root data --out runs/cub-r18
    """
    from dmlkd.config import apply_overrides, from_dict, to_dict
    from dmlkd.engine.distributed import prepare_run_dir_on_main
    from dmlkd.transfer.config import TransferConfig
    from dmlkd.transfer.trainer import check_transfer_config

    items, tree = build_config_tree(params, method)
    config = from_dict(TransferConfig, tree)
    check_transfer_config(config)  # before the run folder is created
    given = apply_overrides({}, items) if resume else to_dict(config)
    run_dir, tree = prepare_run_dir_on_main(
        config.train.device, out, "transfer", given, resume=resume, overwrite=overwrite
    )
    config = from_dict(TransferConfig, tree)

    from dmlkd.engine.report import summary_table
    from dmlkd.transfer.trainer import train_transfer

    result = train_transfer(config, run_dir, resume=resume)
    click.echo(f"teacher mode: {result.teacher_mode}")
    click.echo(summary_table(result.fit, config.eval.metric))
    click.echo(f"run folder: {run_dir}")


@click.group("cache")
def cache_group() -> None:
    """Teacher-output caches for the transfer stage."""


@cache_group.command("build")
@click.option(
    "--method",
    default=None,
    help="The method the cache is for (decides whether pooled features are stored); default relaxed_contrastive.",
)
@_common_options
def cache_build_command(method: str | None, **params: Any) -> None:
    """Build (or verify) the teacher cache a `transfer train` with the same options would use.

    Example: dmlkd cache build --teacher runs/cub-r50 --dataset cub --data-root data --cache-views 8
    """
    from dmlkd.config import from_dict
    from dmlkd.transfer.config import TransferConfig

    _, tree = build_config_tree(params, method)
    config = from_dict(TransferConfig, tree)

    from dmlkd.transfer.trainer import build_cache_for

    click.echo(json.dumps(build_cache_for(config), indent=2))
