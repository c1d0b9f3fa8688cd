"""``dmlkd pipeline self-transfer|dim-reduction|compress`` (torch is imported only when a command runs)."""

from __future__ import annotations

import json
from typing import Any

import click

from dmlkd.pipelines.scenarios import DEMO_SRC, SCENARIOS

_SECTIONS = ("teacher", "transfer", "data")


def _split_sets(items: tuple[str, ...]) -> dict[str, list[str]]:
    """``--set teacher.optim.lr=1e-3`` goes to the teacher stage, ``transfer.…`` to the students and
    ``data.…`` (e.g. ``data.options.verify_counts=false``) to the dataset both stages read."""
    from dmlkd.errors import ConfigError

    sections: dict[str, list[str]] = {name: [] for name in _SECTIONS}
    for item in items:
        section, _, rest = item.partition(".")
        if section not in _SECTIONS or not rest:
            raise ConfigError(
                f"--set {item!r}: pipeline overrides start with teacher., transfer. or data., "
                "e.g. teacher.optim.lr=1e-3 or transfer.train.epochs=10"
            )
        sections[section].append(rest)
    return sections


def _knobs(
    teacher_epochs: int | None,
    epochs: int | None,
    max_steps: int | None,
    batch_size: int | None,
    image_size: int | None,
) -> tuple[list[str], list[str]]:
    both = {
        "train.max_steps": max_steps,
        "train.batch_size": batch_size,
        "train.image_size": image_size,
        "eval.image_size": image_size,
    }
    teacher = {**both, "train.epochs": teacher_epochs}
    transfer = {**both, "train.epochs": epochs}

    def items(values: dict[str, Any]) -> list[str]:
        return [f"{key}={json.dumps(value)}" for key, value in values.items() if value is not None]

    return items(teacher), items(transfer)


def _default_src(name: str, dataset: str) -> str:
    """The scenario's teacher spec; the demo data has its own for compress (see ``DEMO_SRC``)."""
    if dataset == "glyphs" and name in DEMO_SRC:
        return DEMO_SRC[name]
    return SCENARIOS[name].src


def _make_command(name: str) -> click.Command:
    defaults = SCENARIOS[name]

    @click.command(name)
    @click.option(
        "--src",
        default=None,
        help=f"Teacher: a model spec (default {defaults.src}"
        + (f"; {DEMO_SRC[name]} on the glyphs demo" if name in DEMO_SRC else "")
        + "), a run or checkpoint folder, or hf://ORG/NAME[@REVISION].",
    )
    @click.option("--dst", default=None, help=f"Student model spec (default {defaults.dst}).")
    @click.option("--dataset", default=None, help="Dataset name; default: the built-in glyphs demo.")
    @click.option("--data-root", default=None, help="Dataset folder (or CSV file).")
    @click.option("--out", default=None, help=f"Pipeline folder (default runs/{name}-<dataset>).")
    @click.option(
        "--methods",
        default="relaxed_contrastive",
        help="Comma-separated transfer methods, e.g. relaxed_contrastive,rkd,pkt.",
    )
    @click.option("--teacher-epochs", type=int, default=None, help="Epochs of the teacher stage (if trained).")
    @click.option("--epochs", type=int, default=None, help="Epochs of each student.")
    @click.option("--max-steps", type=int, default=None, help="Cap every training stage at N steps.")
    @click.option("--batch-size", type=int, default=None)
    @click.option("--image-size", type=int, default=None)
    @click.option(
        "--export-format",
        type=click.Choice(["safetensors", "onnx", "torch.export"]),
        default="safetensors",
        help="Format of the exported students.",
    )
    @click.option("--device", default="auto", help="auto (default), cpu, cuda or cuda:N.")
    @click.option("--overwrite", is_flag=True, help="Replace a different pipeline run in --out.")
    @click.option("--no-progress", is_flag=True, help="No progress bars.")
    @click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="STAGE.KEY=VALUE",
        help="Stage override, e.g. --set teacher.optim.lr=1e-3 --set transfer.train.views=2.",
    )
    def command(
        src: str | None,
        dst: str | None,
        dataset: str | None,
        data_root: str | None,
        out: str | None,
        methods: str,
        teacher_epochs: int | None,
        epochs: int | None,
        max_steps: int | None,
        batch_size: int | None,
        image_size: int | None,
        export_format: str,
        device: str,
        overwrite: bool,
        no_progress: bool,
        overrides: tuple[str, ...],
    ) -> None:
        from pathlib import Path

        from dmlkd.config import DataConfig, load_config, to_dict
        from dmlkd.pipelines.config import PipelineConfig

        sets = _split_sets(overrides)
        teacher_knobs, transfer_knobs = _knobs(teacher_epochs, epochs, max_steps, batch_size, image_size)
        dataset_name = dataset or "glyphs"
        config = PipelineConfig(
            scenario=name,
            src=src or _default_src(name, dataset_name),
            dst=dst or defaults.dst,
            data=load_config(DataConfig, to_dict(DataConfig(name=dataset_name, root=data_root)), sets["data"]),
            methods=[m.strip() for m in methods.split(",") if m.strip()],
            teacher_overrides=[*teacher_knobs, *sets["teacher"]],
            transfer_overrides=[*transfer_knobs, *sets["transfer"]],
            export_format=export_format,
            device=device,
            progress=not no_progress,
        )
        from dmlkd.pipelines.report import format_summary
        from dmlkd.pipelines.runner import run_pipeline, validate_pipeline

        validate_pipeline(config)

        folder = Path(out or f"runs/{name}-{dataset_name}")
        results = run_pipeline(config, folder, overwrite=overwrite)
        from dmlkd.engine.distributed import is_main

        if is_main():  # under a launcher, one summary
            click.echo(format_summary(results))
            click.echo(f"report: {folder / 'report.md'}")

    command.help = (
        f"{defaults.summary.capitalize()}: {defaults.src} -> {defaults.dst} by default.\n\n"
        f"Trains (or pulls) the teacher, re-checks it, caches its outputs, trains one student per "
        f"method, exports them and writes report.md, results.json and plots into --out."
    )
    return command


@click.group("pipeline")
def pipeline_group() -> None:
    """End-to-end scenarios of the paper: self-transfer, dim-reduction, compress."""


for _name in SCENARIOS:
    pipeline_group.add_command(_make_command(_name))
