"""The ``dmlkd hub pull|push``, ``dmlkd zoo`` and ``dmlkd convert`` commands (heavy imports inside)."""

from __future__ import annotations

import json

import click

from dmlkd.cli.app import main


@main.group("hub")
def hub_group() -> None:
    """Download checkpoints from, and publish them to, the Hugging Face Hub."""


@hub_group.command("pull")
@click.argument("reference", metavar="ORG/NAME[@REVISION]")
@click.option(
    "--out",
    default=None,
    help="Copy the checkpoint into this new folder (default: keep it in the Hub cache and print its path).",
)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--json", "as_json", is_flag=True, help="Print repository, revision, commit and path as JSON.")
def pull_command(reference: str, out: str | None, overwrite: bool, as_json: bool) -> None:
    """Download a dmlkd checkpoint (config.json + *.safetensors + model card), verify it strictly.

    The revision (branch, tag or commit sha; default main) is resolved to a commit sha, which is printed
    and recorded under provenance.hub in --out/config.json. With HF_HUB_OFFLINE=1 only the local cache is
    read.

    Example: dmlkd hub pull my-org/cub-resnet50-512@main --out checkpoints/cub-r50
    """
    from dmlkd.checkpoints.hub import pull

    result = pull(reference, out, overwrite=overwrite)
    snapshot = result.snapshot
    if as_json:
        click.echo(json.dumps({**snapshot.provenance(), "path": str(result.path)}, indent=2))
        return
    click.echo(f"{snapshot.repo_id}@{snapshot.revision} -> commit {snapshot.commit}")
    click.echo(f"checkpoint: {result.path}")
    click.echo(f'load it with dmlkd.load("{result.path}") or dmlkd.load("{snapshot.provenance()["ref"]}")')


@hub_group.command("push")
@click.argument("run_dir", metavar="RUN_DIR")
@click.argument("repo_id", metavar="ORG/NAME")
@click.option(
    "--which",
    type=click.Choice(["last", "best"]),
    default="last",
    show_default=True,
    help="Which checkpoint of a run folder to push: last/ (final step) or best/ (selected on the test split).",
)
@click.option("--private", is_flag=True, default=None, help="Create the repository as private.")
@click.option("--branch", default=None, help="Push to this branch instead of main.")
@click.option("--message", default=None, help="Commit message.")
@click.option("--dry-run", is_flag=True, help="Upload nothing: write the files and model card to --out instead.")
@click.option("--out", default=None, help="Folder for --dry-run (default: ./hub-preview-NAME).")
def push_command(
    run_dir: str,
    repo_id: str,
    which: str,
    private: bool | None,
    branch: str | None,
    message: str | None,
    dry_run: bool,
    out: str | None,
) -> None:
    """Upload a run's last/ (or --which best: best/) checkpoint, or a checkpoint folder, with a generated model card.

    Only config.json, the checkpoint's *.safetensors files and README.md are uploaded. Needs a token with
    write access (`hf auth login` or HF_TOKEN).

    \b
    Examples:
      dmlkd hub push runs/cub-r50 my-org/cub-resnet50-512 --dry-run   # read the model card first
      dmlkd hub push runs/cub-r50 my-org/cub-resnet50-512
    """
    from dmlkd.checkpoints.hub import push

    if out is not None and not dry_run:
        raise click.UsageError("--out is only used with --dry-run")
    preview = (out or f"hub-preview-{repo_id.rsplit('/', 1)[-1]}") if dry_run else None
    result = push(
        run_dir,
        repo_id,
        which=which,
        private=private or None,
        revision=branch,
        commit_message=message,
        dry_run_dir=preview,
    )
    from dmlkd.checkpoints.io import selection_note

    used = f"{result.source} ({selection_note(result.source)})"
    if dry_run:
        click.echo(f"dry run: wrote {', '.join(result.files)} of {used} to {preview} (nothing uploaded)")
        click.echo(f"read {preview}/README.md, then push without --dry-run")
        return
    click.echo(f"pushed {used} to {result.repo_id} (commit {result.commit}): {', '.join(result.files)}")
    click.echo(f"{result.url}")
    click.echo(f'load it with dmlkd.load("hf://{result.repo_id}@{result.commit}")')


@main.command("zoo")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
def zoo_command(as_json: bool) -> None:
    """List known published checkpoints: (dataset, model) -> Hub repository at a pinned commit.

    dmlkd has published no checkpoints yet, so the built-in table is empty; add your own entries in the
    JSON file named by DMLKD_ZOO or at ~/.config/dmlkd/zoo.json ($XDG_CONFIG_HOME/dmlkd/zoo.json).
    """
    from dmlkd.checkpoints.zoo import BUILTIN_ENTRIES, HUB_TEACHERS, user_zoo_file, zoo_entries

    entries = zoo_entries()
    path = user_zoo_file()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "builtin_entries": len(BUILTIN_ENTRIES),
                    "user_file": str(path),
                    "user_file_exists": path.is_file(),
                    "entries": [e.to_dict() for e in entries],
                    "hub_teachers": [t.to_dict() for t in HUB_TEACHERS],
                },
                indent=2,
            )
        )
        return
    click.echo("Published timm teachers, used as is with --teacher/--src NAME (no head; revision not pinned):")
    for teacher in HUB_TEACHERS:
        click.echo(f"  {teacher.name:<46} {teacher.pooled_dim:>5}  {teacher.notes}")
    if not BUILTIN_ENTRIES:
        click.echo("The built-in zoo is empty: dmlkd has not published any checkpoints yet.")
    click.echo(f"User zoo file: {path}" + ("" if path.is_file() else " (not present)"))
    if not entries:
        click.echo(
            'Add entries there as {"entries": [{"dataset": "cub", "model": "resnet50-512", '
            '"repo_id": "ORG/NAME", "revision": "<40-hex commit>", "metrics": {"recall@1": 0.7}}]}.'
        )
        return
    click.echo(f"\n{'dataset':<8} {'model':<18} {'role':<8} {'R@1':>6}  reference")
    for entry in entries:
        recall = entry.metrics.get("recall@1")
        shown = f"{100 * recall:.1f}" if recall is not None else "-"
        click.echo(f"{entry.dataset:<8} {entry.model:<18} {entry.role:<8} {shown:>6}  {entry.reference}")


@main.command("convert")
@click.argument("path", metavar="PATH")
@click.option("--model", "model_spec", required=True, help="bn_inception-512 or resnet50-512 (ARCH-DIM).")
@click.option("--dataset", required=True, help="Dataset the teacher was trained on: cub, cars or sop.")
@click.option("--out", required=True, help="Checkpoint folder to create.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out folder.")
def convert_command(path: str, model_spec: str, dataset: str, out: str, overwrite: bool) -> None:
    """Convert a Proxy-Anchor / LabelRelaxation teacher .pth file into a dmlkd checkpoint folder.

    The file is read with torch.load(weights_only=True) and loaded strictly; a wrong --model names the
    missing and unexpected keys.

    Example: dmlkd convert cub_resnet50_512dim_Proxy_Anchor_ckpt.pth --model resnet50-512 --dataset cub
    --out teachers/cub-r50
    """
    from dmlkd.checkpoints.convert import convert_reference_checkpoint

    result = convert_reference_checkpoint(path, model_spec, dataset, out, overwrite=overwrite)
    dropped = f"; dropped unused {', '.join(result.dropped_keys)}" if result.dropped_keys else ""
    click.echo(f"converted {path} (sha256 {result.source_sha256[:12]}) as {result.model} to {result.out}{dropped}")
