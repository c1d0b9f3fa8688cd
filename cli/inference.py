"""``dmlkd export`` and ``dmlkd embed`` (torch is imported only when a command runs).

Register them on the main group: ``main.add_command(export_command)``, ``main.add_command(embed_command)``.
"""

from __future__ import annotations

import click

from dmlkd.cli.app import main

FORMAT_HELP = "onnx (model.onnx), safetensors (checkpoint folder for dmlkd.load) or torch.export (model.pt2)."


@main.command("export")
@click.argument("ref")
@click.option("--format", "export_format", required=True, metavar="FORMAT", help=FORMAT_HELP)
@click.option("--out", required=True, help="Export folder to create.")
@click.option("--normalize", is_flag=True, help="Bake L2 normalisation of the embedding into the export.")
@click.option("--image-size", type=int, default=None, help="Input size S (default: the checkpoint's, else 224).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
def export_command(
    ref: str, export_format: str, out: str, normalize: bool, image_size: int | None, overwrite: bool
) -> None:
    """Export the embedding model of REF (a checkpoint, hf:// reference or run folder) with a parity check.

    A run folder means its last/ (final step; pass RUN/best for best/, selected on the test split);
    export.json and the summary line name the checkpoint exported.

    The exported model takes RGB (B, 3, S, S) float in [0, 1], applies the model's own preprocessing and
    returns the (B, D) embedding. It is compared with the eager model on seeded random images (cosine >=
    0.9999) before --out is written; export.json records the contract and the parity results.

    \b
    Example: dmlkd export runs/cub-r18 --format onnx --normalize --out exports/cub-r18-onnx
    """
    from dmlkd.inference.export import export_model

    record = export_model(ref, out, export_format, normalize=normalize, image_size=image_size, overwrite=overwrite)
    click.echo(
        f"exported {record['source']['spec']} from {record['source']['checkpoint']} "
        f"({record['source']['checkpoint_note']}) as {export_format} to {out}/{record['artefact']} "
        f"(input {tuple(record['input']['shape'])}, normalized={record['output']['l2_normalized']})"
    )
    click.echo(f"parity: {_parity_line(record['parity'])}")


def _parity_line(parity: dict) -> str:
    if not parity.get("checked"):
        return parity.get("reason", "not checked")
    sizes = ", ".join(str(size) for size in parity["batch_sizes"])
    return (
        f"min cosine {parity['min_cosine']:.7f} >= {parity['threshold']}, max abs diff "
        f"{parity['max_abs_diff']:.3g} (batch sizes {sizes}; {parity['runtime']})"
    )


@main.command("embed")
@click.argument("ref")
@click.argument("images", nargs=-1, required=True)
@click.option("--out", required=True, help="Output .safetensors file (embeddings + image paths in metadata).")
@click.option("--image-size", type=int, default=None, help="Eval crop size (default: the checkpoint's, else 224).")
@click.option(
    "--resize-ratio",
    type=float,
    default=None,
    help="Shorter side is resized to round(size * ratio) before the centre crop (1 = no zoom-in; default: "
    "the checkpoint's recorded ratio, else 256/224).",
)
@click.option("--batch-size", type=int, default=64, show_default=True, help="Images per forward pass.")
@click.option("--normalize", is_flag=True, help="L2-normalise the embeddings.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@click.option(
    "--skip-bad-images", is_flag=True, help="Leave out unreadable image files (and list them) instead of stopping."
)
def embed_command(
    ref: str,
    images: tuple[str, ...],
    out: str,
    image_size: int | None,
    resize_ratio: float | None,
    batch_size: int,
    normalize: bool,
    device: str,
    overwrite: bool,
    skip_bad_images: bool,
) -> None:
    """Embed IMAGES (files or folders of images) with the model of REF and write them to --out.

    REF is a checkpoint or run folder (its last/; RUN/best for best/), an hf://ORG/NAME reference or an export
    folder from `dmlkd export` (ONNX or torch.export). The file records the model's digest and input size,
    so `dmlkd search` can check that queries are embedded by the same model.

    The file holds a tensor "embeddings" (N, D) in the order of the "paths" list in its metadata; read it
    with dmlkd.inference.embed.read_embeddings or safetensors.safe_open.

    \b
    Example: dmlkd embed runs/cub-r18 photos/ --out photos.safetensors --normalize
    """
    from dmlkd.inference.embed import embed_paths

    count, dim, skipped = embed_paths(
        ref,
        images,
        out,
        image_size=image_size,
        resize_ratio="recorded" if resize_ratio is None else resize_ratio,
        batch_size=batch_size,
        normalize=normalize,
        device=device,
        overwrite=overwrite,
        skip_bad_images=skip_bad_images,
    )
    for path, reason in skipped:
        click.echo(f"skipped {path}: {reason}", err=True)
    left_out = f" ({len(skipped)} unreadable images skipped, listed above)" if skipped else ""
    from dmlkd.inference.embed import read_embeddings_metadata

    meta = read_embeddings_metadata(out)
    used = f"{meta.get('checkpoint')} ({meta.get('checkpoint_note') or 'checkpoint'})"
    click.echo(f"wrote {count} embeddings of dimension {dim} to {out}{left_out}; model {used}")


@main.command("search")
@click.argument("queries", nargs=-1, required=True)
@click.option(
    "--gallery",
    "galleries",
    multiple=True,
    required=True,
    help="An embeddings file from `dmlkd embed`, or image files/folders to embed now (repeatable).",
)
@click.option(
    "--model",
    default=None,
    help="Checkpoint/run folder, hf:// reference or export folder that embeds the queries "
    "(default: the one recorded in the embeddings file; needed for an image-folder gallery).",
)
@click.option("-k", "k", type=int, default=5, show_default=True, help="Neighbours per query.")
@click.option(
    "--metric", type=click.Choice(["cosine", "euclidean"]), default="cosine", show_default=True, help="Ranking."
)
@click.option(
    "--backend",
    type=click.Choice(["torch", "faiss"]),
    default="torch",
    show_default=True,
    help="torch: exact search; faiss: needs the faiss extra (pip install faiss-cpu).",
)
@click.option("--image-size", type=int, default=None, help="Input size (default: the gallery's, else the model's).")
@click.option("--labels-from-folders", is_flag=True, help="Treat each image's parent folder as its class.")
@click.option("--include-self", is_flag=True, help="Keep a query that is in the gallery among its own results.")
@click.option("--skip-bad-images", is_flag=True, help="Leave out unreadable images (listed) instead of stopping.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Images per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--grid", default=None, metavar="PNG", help="Also write a PNG grid of queries and neighbours.")
@click.option("--html", "html_out", default=None, metavar="HTML", help="Also write a self-contained HTML page.")
def search_command(
    queries: tuple[str, ...],
    galleries: tuple[str, ...],
    model: str | None,
    k: int,
    metric: str,
    backend: str,
    image_size: int | None,
    labels_from_folders: bool,
    include_self: bool,
    skip_bad_images: bool,
    batch_size: int,
    device: str,
    as_json: bool,
    grid: str | None,
    html_out: str | None,
) -> None:
    """Find the K gallery images nearest to each of QUERIES (image files or folders).

    Queries are embedded by the model that embedded the gallery (the checkpoint or an ONNX/torch.export
    export of it); a model with another digest or input size is refused. With --labels-from-folders the
    pictures frame neighbours of the query's class green and others red.

    \b
    Examples:
      dmlkd embed runs/cub-r18 photos/ --out photos.safetensors
      dmlkd search query.jpg --gallery photos.safetensors -k 5 --html results.html
      dmlkd search queries/ --gallery photos/ --model exports/cub-r18-onnx --json
    """
    import json

    from dmlkd.inference.search import format_results, search_images

    if batch_size < 1:
        raise click.BadParameter(f"must be a positive integer, got {batch_size}", param_hint="--batch-size")
    result = search_images(
        queries,
        galleries[0] if len(galleries) == 1 else galleries,
        model=model,
        k=k,
        metric=metric,
        backend=backend,
        image_size=image_size,
        batch_size=batch_size,
        device=device,
        labels_from_folders=labels_from_folders,
        include_self=include_self,
        skip_bad_images=skip_bad_images,
    )
    from dmlkd.inference.search_render import write_grid, write_html

    if grid:
        result["grid"] = str(write_grid(result, grid))
    if html_out:
        result["html"] = str(write_html(result, html_out))
    for path in result["skipped"]:
        click.echo(f"skipped unreadable image {path}", err=True)
    if as_json:
        click.echo(json.dumps(result, indent=2, ensure_ascii=False))
        return
    click.echo(format_results(result))
    for key in ("grid", "html"):
        if key in result:
            click.echo(f"wrote {result[key]}")
