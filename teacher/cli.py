"""``dmlkd teacher train``: stage 1 on the command line (torch is imported only when a command runs)."""

from __future__ import annotations

import json
from typing import Any

import click

SET_HELP = "Override any config field, e.g. --set optim.lr_decay_step=5 (repeatable)."


@click.group("teacher")
def teacher_group() -> None:
    """Stage 1: train a teacher (source) embedding."""


def _overrides(shortcuts: dict[str, Any], overrides: tuple[str, ...]) -> list[str]:
    items = [f"{key}={json.dumps(value)}" for key, value in shortcuts.items() if value is not None]
    return [*items, *overrides]


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
@click.option("--out", required=True, help="Run folder to create (or resume).")
@click.option("--recipe", default=None, help="Named preset, e.g. pa-cub-bninception (see --list-recipes).")
@click.option("--epochs", type=int, default=None)
@click.option("--max-steps", type=int, default=None, help="Stop after N optimiser steps (smoke runs).")
@click.option("--batch-size", type=int, default=None, help="Images per optimiser step (global).")
@click.option("--ipc", type=int, default=None, help="Images per class in a batch (P x K sampling).")
@click.option("--image-size", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--pretrained/--no-pretrained", default=None, help="Start from ImageNet weights.")
@click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default=None)
@click.option("--num-workers", type=int, default=None)
@click.option("--eval-every", type=int, default=None, help="Evaluate on the test split every N epochs.")
@click.option("--save-every", type=int, default=None, help="Save a resumable state every N optimiser steps.")
@click.option("--deterministic", is_flag=True, default=None, help="Deterministic algorithms (slower on GPUs).")
@click.option("--device", default=None, help="auto (default), cpu, cuda or cuda:N.")
@click.option("--init", "init_ref", default=None, help="Start the network from this checkpoint or run folder.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last saved step.")
@click.option("--overwrite", is_flag=True, help="Replace a run already in --out.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def train_command(
    model_spec: str | None,
    loss: str | None,
    dataset: str | None,
    data_root: str | None,
    out: str,
    recipe: str | None,
    epochs: int | None,
    max_steps: int | None,
    batch_size: int | None,
    ipc: int | None,
    image_size: int | None,
    lr: float | None,
    seed: int | None,
    pretrained: bool | None,
    mixed_precision: str | None,
    num_workers: int | None,
    eval_every: int | None,
    save_every: int | None,
    deterministic: bool | None,
    device: str | None,
    init_ref: str | None,
    intra: bool | None,
    intra_lambda: float | None,
    aug_num: int | None,
    nb_clusters: int | None,
    mod_epoch: int | None,
    force_full_embedding_epoch: int | None,
    masking_lambda: float | None,
    mask_lr_mult: float | None,
    resume: bool,
    overwrite: bool,
    no_progress: bool,
    overrides: tuple[str, ...],
) -> None:
    """Train a teacher embedding and keep last/ and best/ checkpoints in --out.

    Example: dmlkd teacher train --model resnet50-512 --loss proxy_anchor --dataset cub --data-root data
    --out runs/cub-r50
    """
    from dmlkd.config import apply_overrides, from_dict, to_dict
    from dmlkd.engine.distributed import prepare_run_dir_on_main
    from dmlkd.models.spec import parse_spec
    from dmlkd.registry import TEACHER_LOSSES
    from dmlkd.teacher.config import TeacherConfig, start_tree

    spec = parse_spec(model_spec) if model_spec else None
    shortcuts = {
        "model.arch": spec.arch if spec else None,
        "model.embedding_dim": spec.dim if spec else None,
        "model.revision": spec.revision if spec else None,
        "loss.name": loss,
        "data.name": dataset,
        "data.root": data_root,
        "train.epochs": epochs,
        "train.max_steps": max_steps,
        "train.batch_size": batch_size,
        "train.ipc": ipc,
        "train.image_size": image_size,
        "optim.lr": lr,
        "train.seed": seed,
        "model.pretrained": pretrained,
        "train.mixed_precision": mixed_precision,
        "train.num_workers": num_workers,
        "train.eval_every": eval_every,
        "train.save_every": save_every,
        "train.deterministic": deterministic or None,
        "train.device": device,
        "train.progress": False if no_progress else None,
        "init": init_ref,
        "iaa.enabled": intra,
        "iaa.intra_lambda": intra_lambda,
        "iaa.aug_num": aug_num,
        "divide.nb_clusters": nb_clusters,
        "divide.mod_epoch": mod_epoch,
        "divide.force_full_embedding_epoch": force_full_embedding_epoch,
        "divide.masking_lambda": masking_lambda,
        "divide.mask_lr_mult": mask_lr_mult,
    }
    items = _overrides(shortcuts, overrides)
    tree = apply_overrides(start_tree(recipe, dataset, spec.arch if spec else None), items)
    config = from_dict(TeacherConfig, tree)  # validate before touching the output folder
    TEACHER_LOSSES.get(config.loss.name)  # an unknown loss too, not only after the data is read
    given = apply_overrides({}, items) if resume else to_dict(config)
    run_dir, tree = prepare_run_dir_on_main(
        config.train.device, out, "teacher", given, resume=resume, overwrite=overwrite
    )
    config = from_dict(TeacherConfig, tree)

    from dmlkd.engine.report import summary_table
    from dmlkd.teacher.trainer import train_teacher

    result = train_teacher(config, run_dir, resume=resume)
    click.echo(summary_table(result.fit, config.eval.metric))
    click.echo(f"run folder: {run_dir}")
