"""The ``dmlkd`` command line.

Commands are thin: they parse options into a config and call a library function. Heavy imports (torch,
torchvision) happen inside command bodies so ``dmlkd --help`` and ``dmlkd --version`` stay fast and
torch-free. Errors caused by user input (``DmlkdError``) are printed as one line on stderr with exit code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import click

from dmlkd import __version__
from dmlkd.errors import DmlkdError, Interrupted

SET_HELP = "Override any config field, e.g. --set eval.metric=euclidean (repeatable)."


class _Group(click.Group):
    """A group that turns user errors into one readable line instead of a traceback."""

    def main(self, args: Sequence[str] | None = None, *rest: Any, **kwargs: Any) -> Any:
        # ``--debug`` is accepted anywhere on the command line (``dmlkd teacher train ... --debug``): it is
        # moved in front of the subcommand, where the group's option is parsed.
        args = list(sys.argv[1:] if args is None else args)
        cut = args.index("--") if "--" in args else len(args)
        if "--debug" in args[:cut]:
            args = ["--debug", *(a for i, a in enumerate(args) if not (a == "--debug" and i < cut))]
        return super().main(args, *rest, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DmlkdError as error:
            if (ctx.obj or {}).get("debug"):
                raise
            click.echo(f"error: {error}", err=True)
            ctx.exit(2)
        except click.exceptions.NoArgsIsHelpError:
            raise  # a group called without a command: click prints its help
        except click.UsageError as error:  # a bad option value, a missing option, an unknown command
            if (ctx.obj or {}).get("debug"):
                raise
            click.echo(f"error: {_usage_line(error)}", err=True)
            ctx.exit(error.exit_code)
        except Interrupted as stop:
            where = f" in {stop.where}/state" if stop.where else ""
            click.echo(
                f"stopped at step {stop.step}; resumable state saved{where} "
                "(rerun the same command with --resume to continue; pipelines resume by themselves)",
                err=True,
            )
            ctx.exit(128 + stop.signum)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except OSError as error:  # the machine, not the code: a full disk, a read-only or forbidden folder
            if error.errno not in _ENVIRONMENT_ERRNOS or (ctx.obj or {}).get("debug"):
                raise
            click.echo(f"error: {_os_error_line(error)}", err=True)
            ctx.exit(2)
        except Exception as error:  # safetensors' own error type wraps OS errors (a full disk) and bad files
            line = _safetensors_line(error)
            if line is None or (ctx.obj or {}).get("debug"):
                raise
            click.echo(f"error: {line}", err=True)
            ctx.exit(2)


# OS errors that a user fixes on the machine (space, permissions, limits); any other OSError is a bug and
# keeps its traceback.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EMFILE, errno.ENFILE}


def _os_error_line(error: OSError) -> str:
    """``no space left on device: '/runs/x/state' (free some space and rerun; ...)`` on one line."""
    reason = (error.strerror or os.strerror(error.errno or 0)).lower()
    where = f": {str(error.filename)!r}" if error.filename else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free some space and rerun; checkpoints already written are intact and training resumes with --resume"
    elif error.errno in (errno.EMFILE, errno.ENFILE):
        hint = "raise the open-file limit (ulimit -n) or lower data.num_workers"
    else:
        hint = "choose a folder you can write to (--out) or fix its permissions"
    return f"{reason}{where} ({hint})"


def _safetensors_line(error: BaseException) -> str | None:
    """One line for a ``SafetensorError`` (an OS error it wraps is reported like one), else None."""
    if type(error).__name__ != "SafetensorError" or not type(error).__module__.startswith("safetensors"):
        return None
    text = " ".join(str(error).split())
    code = re.search(r"\(os error (\d+)\)", text)
    if code and int(code.group(1)) in _ENVIRONMENT_ERRNOS:
        number = int(code.group(1))
        path = re.search(r'at path "([^"]+)"', text)
        return _os_error_line(OSError(number, os.strerror(number), path.group(1) if path else None))
    return f"a safetensors file could not be read or written: {text} (re-create the file, or rerun with --debug)"


def _usage_line(error: click.UsageError) -> str:
    """Click's message on one line, the valid commands for an unknown one, and where the help is."""
    text = error.format_message()
    if error.ctx is None:
        return text
    if isinstance(error.ctx.command, click.Group) and text.startswith("No such command") and "?" not in text:
        text = f"{text.rstrip('.')}; commands: {', '.join(error.ctx.command.list_commands(error.ctx))}"
    return f"{text} (see '{error.ctx.command_path} --help')"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="dmlkd")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """dmlkd: train a metric-learning teacher, then distil its embedding space into a compact student."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def set_option(function: Any) -> Any:
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)(function)


def shortcut_overrides(shortcuts: dict[str, Any], overrides: Sequence[str]) -> list[str]:
    """Turn explicitly given shortcut flags into ``--set`` items placed before the user's own overrides."""
    items = [f"{key}={json.dumps(value)}" for key, value in shortcuts.items() if value is not None]
    return [*items, *overrides]


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
    from dmlkd.config import EvalCommandConfig, load_config

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

    from dmlkd.engine.evaluate import describe_selection, run_eval_command
    from dmlkd.evaluation import format_table

    results = run_eval_command(config)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    about = ("checkpoint", "selected", "checkpoint_note", "epoch", "step", "metric", "dataset")
    click.echo(format_table({k: v for k, v in results.items() if k not in about}))
    click.echo(describe_selection(results))


def _register_stage_commands() -> None:
    # Stage command groups live next to their code; importing them is cheap (no torch at import time).
    from dmlkd.checkpoints.cli import convert_command, hub_group, zoo_command
    from dmlkd.pipelines.cli import pipeline_group
    from dmlkd.student.cli import embed_command, export_command, search_command
    from dmlkd.teacher.cli import teacher_group
    from dmlkd.transfer.cli import cache_group, transfer_group

    main.add_command(teacher_group)
    main.add_command(transfer_group)
    main.add_command(cache_group)
    from dmlkd.transfer.cache_cli import cache_clean_command, cache_ls_command

    cache_group.add_command(cache_ls_command)
    cache_group.add_command(cache_clean_command)
    main.add_command(pipeline_group)
    main.add_command(export_command)
    main.add_command(embed_command)
    main.add_command(search_command)
    main.add_command(hub_group)
    main.add_command(zoo_command)
    main.add_command(convert_command)


_register_stage_commands()


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
