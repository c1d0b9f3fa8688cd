"""Command-line option groups shared by the training commands, defined once (torch-free).

``teacher train``, ``transfer train`` and every ``pipeline`` command take the same run options
(``RUN_FLAGS``), with the same names and help, generated from this one table; a test checks that they
cannot drift. Each flag names the config field(s) it sets. A training command turns its flags into
``KEY=VALUE`` items (``stage_items`` for a stage command, ``pipeline_items`` for the pipelines), applied over
the ``--config`` file and under ``--set``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import click

from dmlkd.engine.tracking import check_trackers

SET_HELP = "Override any config field, e.g. --set eval.metric=euclidean (repeatable)."
MODEL = "{model}"  # the model section of a stage: ``model`` (teacher) or ``student`` (transfer)


@dataclass(frozen=True)
class Flag:
    """One shared option: its click declaration and the config keys it sets (``MODEL`` is the stage's model)."""

    decls: tuple[str, ...]
    dest: str
    keys: tuple[str, ...]
    help: str
    type: Any = None
    is_flag: bool = False
    metavar: str | None = None

    def option(self) -> Callable[[Any], Any]:
        kwargs: dict[str, Any] = {"default": None, "help": self.help}
        if self.is_flag:
            kwargs["is_flag"] = True
        elif self.type is not None:
            kwargs["type"] = self.type
        if self.metavar:
            kwargs["metavar"] = self.metavar
        return click.option(*self.decls, self.dest, **kwargs)

    def value(self, params: dict[str, Any]) -> Any:
        value = params.get(self.dest)
        if self.is_flag:
            return True if value else None
        return value


RUN_FLAGS: tuple[Flag, ...] = (
    Flag(("--epochs",), "epochs", ("train.epochs",), "Training epochs.", int, metavar="N"),
    Flag(
        ("--max-steps",),
        "max_steps",
        ("train.max_steps",),
        "Stop after N optimiser steps (smoke runs).",
        int,
        metavar="N",
    ),
    Flag(
        ("--batch-size",),
        "batch_size",
        ("train.batch_size",),
        "Distinct images per optimiser step (global, before views).",
        int,
        metavar="N",
    ),
    Flag(
        ("--image-size",),
        "image_size",
        ("train.image_size", "eval.image_size"),
        "Training crop and evaluation size in pixels (default: the dataset's; 224 for the public datasets).",
        int,
        metavar="PX",
    ),
    Flag(("--lr",), "lr", ("optim.lr",), "Learning rate.", float),
    Flag(("--seed",), "seed", ("train.seed",), "Random seed (sampling, augmentation, initialisation).", int),
    Flag(
        ("--pretrained/--no-pretrained",),
        "pretrained",
        (f"{MODEL}.pretrained",),
        "Start the backbone from ImageNet weights (--no-pretrained: from scratch; BN-freeze and warm-up of a "
        "recipe are then turned off).",
    ),
    Flag(
        ("--mixed-precision",),
        "mixed_precision",
        ("train.mixed_precision",),
        "Autocast precision: no, bf16 or fp16 (GPU only).",
        click.Choice(["no", "fp16", "bf16"]),
    ),
    Flag(("--num-workers",), "num_workers", ("train.num_workers",), "Data-loader worker processes.", int),
    Flag(
        ("--eval-every",),
        "eval_every",
        ("train.eval_every",),
        "Evaluate on the test split every N epochs (and at the end).",
        int,
        metavar="N",
    ),
    Flag(
        ("--save-every",),
        "save_every",
        ("train.save_every",),
        "Save a resumable state every N optimiser steps (default: at each epoch end).",
        int,
        metavar="N",
    ),
    Flag(
        ("--deterministic",),
        "deterministic",
        ("train.deterministic",),
        "Deterministic algorithms (slower on GPUs).",
        is_flag=True,
    ),
    Flag(("--device",), "device", ("train.device",), "auto (default), cpu, cuda or cuda:N."),
    Flag(
        ("--no-progress",),
        "no_progress",
        ("train.progress",),
        "No progress bars (a setting that may change on --resume).",
        is_flag=True,
    ),
)
# The pipelines train a teacher and students: these go to the students, --teacher-* to the teacher.
STUDENT_ONLY = ("epochs", "lr")
PIPELINE_TEACHER_FLAGS: tuple[Flag, ...] = (
    Flag(("--teacher-epochs",), "teacher_epochs", ("train.epochs",), "Epochs of the teacher stage.", int),
    Flag(("--teacher-lr",), "teacher_lr", ("optim.lr",), "Learning rate of the teacher stage.", float),
)

REPORT_TO_HELP = (
    "Log to experiment trackers through Accelerate: tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive, "
    "swanlab or trackio (repeatable or comma-separated; local ones write under RUN/trackers)."
)


def _check_report_to(_ctx: Any, _param: Any, value: tuple[str, ...]) -> tuple[str, ...] | None:
    """``--report-to`` (comma-separated and/or repeated), checked when the command line is read."""
    names = [part.strip() for item in value for part in item.split(",") if part.strip()]
    return tuple(check_trackers(names)) if names else None


report_to_option = click.option(
    "--report-to", "report_to", multiple=True, metavar="TRACKER", callback=_check_report_to, help=REPORT_TO_HELP
)

CONFIG_HELP = (
    "Read the config from this YAML (or JSON) file; command-line flags and --set override it. "
    "--print-config output is such a file."
)
PRINT_HELP = "Print the fully resolved config (YAML) and exit without training; feed it back with --config."


def apply_options(function: Any, options: Sequence[Callable[[Any], Any]]) -> Any:
    """Decorate ``function`` with click options so that ``--help`` lists them in the given order."""
    for option in reversed(options):
        function = option(function)
    return function


def option_group(*options: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """One decorator that adds ``options`` (click options or other groups) in the order given."""

    def decorate(function: Any) -> Any:
        return apply_options(function, options)

    return decorate


def overrides_option(help_text: str) -> Callable[[Any], Any]:
    """``--set KEY=VALUE`` (repeatable, into ``overrides``), with the command's own example in ``help_text``."""
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=help_text)


# ``--out``, ``--resume`` and ``--overwrite`` of a stage command (the run folder, ``engine/rundir.py``).
run_folder_options = option_group(
    click.option("--out", default=None, help="Run folder to create (or resume); needed unless --print-config."),
    click.option("--resume", is_flag=True, help="Continue the run in --out from its last saved step."),
    click.option(
        "--overwrite",
        is_flag=True,
        help="Replace a run already in --out (it is kept until the new run saved its first state).",
    ),
)

# ``RUN_FLAGS`` plus ``--config`` and ``--print-config``, the options of every training command.
run_options = option_group(
    click.option(
        "--config",
        "config_file",
        default=None,
        metavar="FILE",
        type=click.Path(dir_okay=False),
        help=CONFIG_HELP,
    ),
    click.option("--print-config", "print_config", is_flag=True, default=False, help=PRINT_HELP),
    *(flag.option() for flag in RUN_FLAGS),
    report_to_option,
)

pipeline_teacher_options = option_group(*(flag.option() for flag in PIPELINE_TEACHER_FLAGS))


def items(values: dict[str, Any]) -> list[str]:
    """``KEY=VALUE`` items for the values that were given (``None`` means not given)."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items() if value is not None]


def _report_to(params: dict[str, Any]) -> list[str] | None:
    trackers = params.get("report_to")
    return list(trackers) if trackers else None


def _run_flag_values(params: dict[str, Any], model_section: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Config key -> value of the run flags (``--no-progress`` sets progress false; None = not given)."""
    values: dict[str, Any] = {"train.report_to": _report_to(params)}
    for flag in RUN_FLAGS:
        if flag.dest in skip:
            continue
        value = flag.value(params)
        if flag.dest == "no_progress" and value:
            value = False
        for key in flag.keys:
            values[key.replace(MODEL, model_section)] = value
    return values


def stage_items(params: dict[str, Any], model_section: str) -> list[str]:
    """The run flags of a stage command as ``KEY=VALUE`` items."""
    return items(_run_flag_values(params, model_section))


def pipeline_items(params: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The run flags of a pipeline command: (teacher items, student items)."""
    teacher = _run_flag_values(params, "model", skip=STUDENT_ONLY)
    for flag in PIPELINE_TEACHER_FLAGS:
        for key in flag.keys:
            teacher[key] = flag.value(params)
    return items(teacher), items(_run_flag_values(params, "student"))


def shared_flag_names() -> list[str]:
    """The option names every training command must expose (used by the drift test)."""
    names = ["--config", "--print-config", "--report-to"]
    for flag in RUN_FLAGS:
        names.extend(part for decl in flag.decls for part in decl.split("/"))
    return names


def print_resolved(config: Any, stage: str) -> None:
    """``--print-config``: validate like a run would (data read, defaults resolved) and print YAML."""
    from dmlkd.config.convert import to_dict
    from dmlkd.config.files import dump_config

    if stage == "teacher":
        from dmlkd.teacher.trainer import prepare_teacher

        config = prepare_teacher(config).config
    elif stage == "transfer":
        from dmlkd.transfer.trainer import prepare_transfer

        config = prepare_transfer(config).config
    click.echo(dump_config(to_dict(config)), nl=False)


def run_stage_command(stage: str, config: Any, given: dict[str, Any], notes: list[str], params: dict[str, Any]) -> None:
    """The common end of ``teacher train`` and ``transfer train``: print the config, or train and summarise.

    ``params`` holds the command's ``--print-config`` and run-folder options (``run_options`` and
    ``run_folder_options``), which both commands pass on untouched.
    """
    out, print_config = params["out"], params["print_config"]
    if print_config:
        print_resolved(config, stage)
        return
    if not out:
        raise click.UsageError("Missing option '--out' (the run folder).")
    for note in notes:
        click.echo(f"note: {note}", err=True)
    from dmlkd.engine.run_lock import check_not_in_use

    check_not_in_use(out)  # a busy folder is refused before the training code (torch, torchvision) loads
    from dmlkd.engine.summary import summary_table

    if stage == "teacher":
        from dmlkd.teacher.trainer import run_teacher as run
    else:
        from dmlkd.transfer.trainer import run_transfer as run
    result = run(config, out, resume=params["resume"], overwrite=params["overwrite"], given=given)
    if stage == "transfer":
        click.echo(f"teacher mode: {result.teacher_mode}")
    click.echo(summary_table(result.fit, config.eval.metric))
    click.echo(f"run folder: {result.run_dir}")


set_option = overrides_option(SET_HELP)


def shortcut_overrides(shortcuts: dict[str, Any], overrides: Sequence[str]) -> list[str]:
    """Turn explicitly given shortcut flags into ``--set`` items placed before the user's own overrides."""
    items = [f"{key}={json.dumps(value)}" for key, value in shortcuts.items() if value is not None]
    return [*items, *overrides]
