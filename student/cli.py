"""``dmlkd export`` and ``dmlkd embed`` (torch is imported only when a command runs).

Register them on the main group: ``main.add_command(export_command)``, ``main.add_command(embed_command)``.
"""

from __future__ import annotations

import click

FORMAT_HELP = "onnx (model.onnx), safetensors (checkpoint folder for dmlkd.load) or torch.export (model.pt2)."


@click.command("export")
@click.argument("ref")
@click.option("--format", "export_format", required=True, metavar="FORMAT", help=FORMAT_HELP)
@click.option("--out", required=True, help="Export folder to create.")
@click.option("--normalize", is_flag=True, help="Bake L2 normalisation of the embedding into the export.")
@click.option("--image-size", type=int, default=None, help="Input size S (default: the checkpoint's, else 224).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
def export_command(
    ref: str, export_format: str, out: str, normalize: bool, image_size: int | None, overwrite: bool
) -> None:
    """Export the embedding model of REF (a run or checkpoint folder) with a parity check.

    The exported model takes RGB (B, 3, S, S) float in [0, 1], applies the model's own preprocessing and
    returns the (B, D) embedding. It is compared with the eager model on seeded random images (cosine >=
    0.9999) before --out is written; export.json records the contract and the parity results.

    \b
    Example: dmlkd export runs/cub-r18 --format onnx --normalize --out exports/cub-r18-onnx
    """
    from dmlkd.student.export import export_model

    record = export_model(ref, out, export_format, normalize=normalize, image_size=image_size, overwrite=overwrite)
    click.echo(
        f"exported {record['source']['spec']} as {export_format} to {out}/{record['artefact']} "
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


@click.command("embed")
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
) -> None:
    """Embed IMAGES (files or folders of images) with the model of REF and write them to --out.

    The file holds a tensor "embeddings" (N, D) in the order of the "paths" list in its metadata; read it
    with dmlkd.student.embed.read_embeddings or safetensors.safe_open.

    \b
    Example: dmlkd embed runs/cub-r18 photos/ --out photos.safetensors --normalize
    """
    from dmlkd.student.embed import embed_paths

    count, dim = embed_paths(
        ref,
        images,
        out,
        image_size=image_size,
        resize_ratio="recorded" if resize_ratio is None else resize_ratio,
        batch_size=batch_size,
        normalize=normalize,
        device=device,
        overwrite=overwrite,
    )
    click.echo(f"wrote {count} embeddings of dimension {dim} to {out}")
