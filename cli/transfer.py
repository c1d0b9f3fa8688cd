"""``dmlkd transfer train`` and ``dmlkd cache build``: flags into a ``TransferConfig``, then the library call.

Torch is imported only once the config is known to be valid (a misspelt recipe or model spec fails at once).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from dmlkd.cli.app import main
from dmlkd.cli.options import (
    items,
    option_group,
    overrides_option,
    run_folder_options,
    run_options,
    run_stage_command,
    stage_items,
)

SET_HELP = "Override any config field, e.g. --set method.kwargs.sigma=0.5 (repeatable; applied last)."


# The options ``resolve_command_config`` reads besides ``--method`` (``transfer_options``).
_CONFIG_OPTIONS = (
    click.option(
        "--teacher",
        "teacher_ref",
        default=None,
        help="Teacher run or checkpoint folder, or a published timm model timm/NAME[.TAG][@REV] (no head).",
    ),
    click.option("--student", "student_spec", default=None, help="ARCH-DIM (resnet18-128) or timm/NAME[.TAG]-DIM."),
    click.option("--dataset", default=None, help="Dataset name (see `dmlkd datasets`); default glyphs."),
    click.option("--data-root", default=None, help="Dataset folder (or CSV file)."),
    click.option(
        "--transfer-set",
        default=None,
        help="Train on this folder of unlabeled images (recursive) instead of the dataset's train split; "
        "label-free methods only, random batches; --dataset still gives the test split.",
    ),
    click.option(
        "--recipe", default=None, help="Named preset: lr-cub, lr-cars, lr-sop, demo-glyphs (`dmlkd recipes`)."
    ),
    click.option(
        "--teacher-mode",
        type=click.Choice(["auto", "online", "cached", "clean"]),
        default=None,
        help="online: teacher on every step (default); cached: exact-replay cache of K views per image; "
        "clean: one centre-crop view per image (a different, cheaper method).",
    ),
    click.option(
        "--cache-views", type=int, default=None, help="K pre-drawn views per image in the cache (cached mode)."
    ),
    click.option(
        "--cache-refresh-epochs",
        type=int,
        default=None,
        help="Re-draw the K cached views every E epochs (more view diversity; K*N teacher passes per E).",
    ),
    click.option("--ipc", type=int, default=None, help="Images per class in a batch (P x K sampling)."),
    click.option("--views", type=int, default=None, help="Augmented views per image (the reference: 2)."),
)


def transfer_options(method_help: str, *before_run_options: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The options of a command that resolves a ``TransferConfig`` (``transfer train``, ``cache build``).

    ``--method`` comes first, with ``method_help`` saying what the method is for in that command; then the
    transfer options, ``before_run_options`` (``transfer train``: the run folder's, as ``teacher train`` has
    them), the run options and ``--set``.
    """
    method = click.option("--method", default=None, help=method_help)
    return option_group(method, *_CONFIG_OPTIONS, *before_run_options, run_options, overrides_option(SET_HELP))


def resolve_command_config(params: dict[str, Any], config_file: str | None, overrides: tuple[str, ...]) -> Any:
    """The ``TransferConfig`` of a command line, what it gave explicitly, and notes on resolved values.

    ``params`` are the values of ``transfer_options``; the ones used here are taken out of it.
    """
    from dmlkd.config.files import read_config_file
    from dmlkd.models.spec import parse_spec
    from dmlkd.transfer.config import resolve_transfer_config

    spec = parse_spec(params["student_spec"]) if params["student_spec"] else None
    shortcuts = {
        "teacher.ref": params.pop("teacher_ref"),
        "teacher.mode": params.pop("teacher_mode"),
        "teacher.cache_views": params.pop("cache_views"),
        "teacher.cache_refresh_epochs": params.pop("cache_refresh_epochs"),
        "student.arch": spec.arch if spec else None,
        "student.embedding_dim": spec.dim if spec else None,
        "student.revision": spec.revision if spec else None,
        "method.name": params.pop("method"),
        "data.name": params.pop("dataset"),
        "data.root": params.pop("data_root"),
        "transfer_set": params.pop("transfer_set"),
        "train.ipc": params.pop("ipc"),
        "train.views": params.pop("views"),
    }
    params.pop("student_spec")
    recipe = params.pop("recipe")
    file_tree = read_config_file(config_file) if config_file else None
    return resolve_transfer_config(recipe, file_tree, [*items(shortcuts), *stage_items(params, "student"), *overrides])


@main.group("transfer")
def transfer_group() -> None:
    """Stage 2: distil a teacher's embedding space into a student."""


@transfer_group.command("train")
@transfer_options(
    "relaxed_contrastive (default), relaxed_ms, rkd, pkt, darkrank, fitnet, attention or crd.", run_folder_options
)
def train_command(config_file: str | None, overrides: tuple[str, ...], **params: Any) -> None:
    """Train a student against a frozen teacher; last/ and best/ checkpoints go to --out.

    Example: dmlkd transfer train --teacher runs/cub-r50 --student resnet18-128 --method relaxed_contrastive
    --dataset cub --data-root data --out runs/cub-r18
    """
    config, given, notes = resolve_command_config(params, config_file, overrides)
    run_stage_command("transfer", config, given, notes, params)
