"""``dmlkd pipeline self-transfer|dim-reduction|compress``: flags into a ``PipelineConfig``, then ``run_pipeline``.

The run flags are the stage commands' own (``dmlkd.cli.options``): ``--epochs`` and ``--lr`` go to the students,
``--teacher-epochs`` and ``--teacher-lr`` to the teacher, the others to both stages. A finished pipeline rerun
with the same options says so at once, without importing torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from dmlkd.cli.app import main
from dmlkd.cli.options import pipeline_items, pipeline_teacher_options, run_options
from dmlkd.pipelines.scenarios import DEMO_TEACHER, SCENARIOS


def _make_command(name: str) -> click.Command:
    defaults = SCENARIOS[name]

    @click.command(name)
    @click.option(
        "--src",
        default=None,
        help=f"Teacher: a model spec (default {defaults.teacher}"
        + (f"; {DEMO_TEACHER[name]} on the glyphs demo" if name in DEMO_TEACHER else "")
        + "), a run or checkpoint folder, or hf://ORG/NAME[@REVISION].",
    )
    @click.option("--dst", default=None, help=f"Student model spec (default {defaults.student}).")
    @click.option("--dataset", default=None, help="Dataset name; default: the built-in glyphs demo.")
    @click.option("--data-root", default=None, help="Dataset folder (or CSV file).")
    @click.option("--out", default=None, help=f"Pipeline folder (default runs/{name}-<dataset>).")
    @click.option(
        "--transfer-set",
        default=None,
        help="Distil the students on this folder of unlabeled images (label-free methods, random batches); "
        "--dataset still gives the test split.",
    )
    @click.option(
        "--methods",
        default=None,
        help="Comma-separated transfer methods, e.g. relaxed_contrastive,rkd,pkt (default relaxed_contrastive).",
    )
    @pipeline_teacher_options
    @click.option(
        "--export-format",
        type=click.Choice(["safetensors", "onnx", "torch.export"]),
        default=None,
        help="Format of the exported students (default safetensors).",
    )
    @click.option(
        "--overwrite",
        is_flag=True,
        help="Replace a different pipeline run in --out (kept until the new run saved its first state).",
    )
    @click.option("--regenerate-report", is_flag=True, help="Write report.md and the plots again on a finished run.")
    @run_options
    @click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="STAGE.KEY=VALUE",
        help="Stage override, e.g. --set teacher.optim.lr=1e-3 --set transfer.train.views=2 (applied last).",
    )
    def command(
        src: str | None,
        dst: str | None,
        dataset: str | None,
        data_root: str | None,
        out: str | None,
        transfer_set: str | None,
        methods: str | None,
        export_format: str | None,
        overwrite: bool,
        regenerate_report: bool,
        config_file: str | None,
        print_config: bool,
        overrides: tuple[str, ...],
        **params: Any,
    ) -> None:
        from dmlkd.config.convert import to_dict
        from dmlkd.config.files import dump_config, read_config_file
        from dmlkd.pipelines.config import build_pipeline_config

        teacher_items, transfer_items = pipeline_items(params)
        if transfer_set is not None:
            transfer_items.append(f"transfer_set={json.dumps(transfer_set)}")
        config, notes = build_pipeline_config(
            name,
            src=src,
            dst=dst,
            methods=[m.strip() for m in methods.split(",") if m.strip()] if methods else None,
            data={"name": dataset, "root": data_root},
            teacher_items=teacher_items,
            transfer_items=transfer_items,
            sets=overrides,
            file_tree=read_config_file(config_file) if config_file else None,
            export_format=export_format,
        )
        if print_config:
            click.echo(dump_config(to_dict(config)), nl=False)
            return
        folder = Path(out or f"runs/{name}-{config.data.name}")
        from dmlkd.pipelines.state import finished_results

        done = None if (overwrite or regenerate_report) else finished_results(folder, config)
        if done is not None:  # nothing to do: no torch import, no report rewrite
            from dmlkd.pipelines.report_text import format_summary

            click.echo(f"nothing to do: the pipeline in {str(folder)!r} has finished with these options")
            click.echo(format_summary(done))
            click.echo(f"report: {folder / 'report.md'} (--regenerate-report writes it again)")
            return
        for note in notes:
            click.echo(f"note: {note}", err=True)

        from dmlkd.engine.distributed import is_main
        from dmlkd.pipelines.runner import run_pipeline, validate_pipeline

        validate_pipeline(config)
        results = run_pipeline(config, folder, overwrite=overwrite, regenerate_report=regenerate_report)
        if is_main():  # under a launcher, one summary
            from dmlkd.pipelines.report_text import format_summary

            click.echo(format_summary(results))
            click.echo(f"report: {folder / 'report.md'}")

    command.help = (
        f"{defaults.summary.capitalize()}: {defaults.teacher} -> {defaults.student} by default.\n\n"
        f"Trains (or pulls) the teacher, re-checks it, caches its outputs, trains one student per "
        f"method, exports them and writes report.md, results.json and plots into --out."
    )
    return command


@main.group("pipeline")
def pipeline_group() -> None:
    """End-to-end scenarios of the paper: self-transfer, dim-reduction, compress."""


for _name in SCENARIOS:
    pipeline_group.add_command(_make_command(_name))
