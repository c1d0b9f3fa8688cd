"""``dmlkd teacher train``: parse the flags into a ``TeacherConfig`` and call ``run_teacher``.

Torch is imported only once the config is known to be valid (a misspelt recipe or model spec fails at once).
"""

from __future__ import annotations

from typing import Any

import click

from dmlkd.cli.app import main
from dmlkd.cli.options import items, overrides_option, run_folder_options, run_options, run_stage_command, stage_items

SET_HELP = "Override any config field, e.g. --set optim.lr_decay_step=5 (repeatable; applied last)."


@main.group("teacher")
def teacher_group() -> None:
    """Stage 1: train a teacher (source) embedding."""


@teacher_group.command("train")
@click.option(
    "--model",
    "model_spec",
    default=None,
    help="ARCH-DIM, e.g. resnet50-512 (see `dmlkd models`), or timm/NAME[.TAG]-DIM.",
)
@click.option(
    "--loss",
    default=None,
    help="proxy_anchor (default), arcmargin, softmax, norm_softmax, multi_similarity, contrastive, margin, "
    "triplet, quadruplet, eml or npairs.",
)
@click.option("--intra", is_flag=True, default=None, help="Intra-class adaptive augmentation around the loss.")
@click.option("--intra-lambda", type=float, default=None, help="IAA: scale of the synthetic offsets (0.8).")
@click.option("--aug-num", type=int, default=None, help="IAA: synthetic samples per real sample (3).")
@click.option("--nb-clusters", type=int, default=None, help="Divide and conquer: K clusters and learners (1).")
@click.option("--mod-epoch", type=int, default=None, help="Divide and conquer: recluster every N epochs (2).")
@click.option(
    "--force-full-embedding-epoch",
    type=int,
    default=None,
    help="Divide and conquer: from this epoch on, train the full embedding.",
)
@click.option("--masking-lambda", type=float, default=None, help="D&C masks: weight of the L1 mask penalty (0.01).")
@click.option("--mask-lr-mult", type=float, default=None, help="D&C masks: learning-rate multiplier (100).")
@click.option("--dataset", default=None, help="Dataset name (see `dmlkd datasets`); default glyphs (demo).")
@click.option("--data-root", default=None, help="Dataset folder (or CSV file).")
@click.option("--recipe", default=None, help="Named preset, e.g. pa-cub-bninception (list: `dmlkd recipes`).")
@click.option("--ipc", type=int, default=None, help="Images per class in a batch (P x K sampling).")
@click.option("--init", "init_ref", default=None, help="Start the network from this checkpoint or run folder.")
@run_folder_options
@run_options
@overrides_option(SET_HELP)
def train_command(
    model_spec: str | None,
    loss: str | None,
    dataset: str | None,
    data_root: str | None,
    recipe: str | None,
    ipc: int | None,
    init_ref: str | None,
    config_file: str | None,
    overrides: tuple[str, ...],
    **params: Any,
) -> None:
    """Train a teacher embedding and keep last/ and best/ checkpoints in --out.

    Example: dmlkd teacher train --model resnet50-512 --loss proxy_anchor --dataset cub --data-root data
    --out runs/cub-r50
    """
    from dmlkd.config.files import read_config_file
    from dmlkd.models.spec import parse_spec
    from dmlkd.teacher.config import resolve_teacher_config

    spec = parse_spec(model_spec) if model_spec else None
    shortcuts = {
        "model.arch": spec.arch if spec else None,
        "model.embedding_dim": spec.dim if spec else None,
        "model.revision": spec.revision if spec else None,
        "loss.name": loss,
        "data.name": dataset,
        "data.root": data_root,
        "train.ipc": ipc,
        "init": init_ref,
        "iaa.enabled": params.pop("intra"),
        "iaa.intra_lambda": params.pop("intra_lambda"),
        "iaa.aug_num": params.pop("aug_num"),
        "divide.nb_clusters": params.pop("nb_clusters"),
        "divide.mod_epoch": params.pop("mod_epoch"),
        "divide.force_full_embedding_epoch": params.pop("force_full_embedding_epoch"),
        "divide.masking_lambda": params.pop("masking_lambda"),
        "divide.mask_lr_mult": params.pop("mask_lr_mult"),
    }
    file_tree = read_config_file(config_file) if config_file else None
    config, given, notes = resolve_teacher_config(
        recipe, file_tree, [*items(shortcuts), *stage_items(params, "model"), *overrides]
    )
    from dmlkd.registry import TEACHER_LOSSES

    TEACHER_LOSSES.get(config.loss.name)  # a misspelt loss fails before the data is read
    run_stage_command("teacher", config, given, notes, params)
