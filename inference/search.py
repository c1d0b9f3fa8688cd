"""Image retrieval with a trained model: the top-k gallery neighbours of query images (``dmlkd search``).

The gallery is an embeddings file written by ``dmlkd embed`` (or ``save_embeddings``), or image files and
folders embedded on the fly. Queries are embedded by the model that embedded the gallery -- the checkpoint
itself or an export of it (ONNX, torch.export): the file records the source checkpoint's ``model.safetensors``
digest and the input size, and a query model with another digest or input size is refused, because its
embeddings would live in a different space and the neighbours would be meaningless.

Ranking uses ``dmlkd.evaluation.knn`` (exact torch search by default, faiss on request): cosine similarity or
negative squared Euclidean distance, larger is closer, ties by lower gallery index. A query that is itself a
gallery image (same resolved path) is left out of its own neighbours unless ``include_self``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from dmlkd.errors import ConfigError, DataError
from dmlkd.evaluation.knn import knn
from dmlkd.inference.embed import EMBEDDINGS_FORMAT, checked_image_size, expand_image_paths, read_embeddings
from dmlkd.inference.embedder import Embedder, embed_files, load_embedder
from dmlkd.models.inputs import DEFAULT_RESIZE_RATIO


@dataclass
class Gallery:
    """Gallery embeddings ``(G, D)``, their image paths and how they were made (``dmlkd embed`` metadata)."""

    embeddings: Tensor
    paths: list[str]
    meta: dict[str, Any]
    source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)


def is_embeddings_file(source: str | os.PathLike) -> bool:
    """True when ``source`` is a safetensors file written by ``dmlkd embed``."""
    path = Path(source)
    if not path.is_file() or path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format") == EMBEDDINGS_FORMAT
    except Exception:  # any unreadable file is "not an embeddings file"; read_embeddings says why
        return False


def check_same_model(meta: dict[str, Any], embedder: Embedder, source: str) -> None:
    """Refuse a query model whose weights or input size differ from those that embedded the gallery."""
    digest = meta.get("model_digest")
    if not digest:
        raise DataError(
            f"embeddings file {source!r} does not record the model that made it; embed the gallery again "
            "with `dmlkd embed`"
        )
    if embedder.model_digest != digest:
        raise ConfigError(
            f"model {embedder.ref!r} (digest {embedder.model_digest[:12]}) did not embed {source!r} (made by "
            f"{meta.get('model_ref') or meta.get('checkpoint')!r}, digest {str(digest)[:12]}); use that "
            "checkpoint or an export of it"
        )
    size = meta.get("image_size")
    if embedder.fixed_size and size is not None and embedder.image_size != size:
        raise ConfigError(
            f"model {embedder.ref!r} takes {embedder.image_size}x{embedder.image_size} inputs but {source!r} was "
            f"embedded at {size}x{size}; export the model with --image-size {size}"
        )


def load_gallery_file(path: str | os.PathLike) -> Gallery:
    embeddings, paths, meta = read_embeddings(path)
    return Gallery(embeddings.float(), [str(p) for p in paths], meta, str(path))


def embed_gallery(
    sources: Sequence[str | os.PathLike],
    embedder: Embedder,
    image_size: int,
    resize_ratio: float | None,
    batch_size: int,
    skip_bad: bool,
) -> Gallery:
    """Embed gallery image files/folders with ``embedder`` (the metadata a ``dmlkd embed`` file would hold)."""
    embeddings, kept, skipped = embed_files(
        embedder, expand_image_paths(sources), image_size, resize_ratio, batch_size, skip_bad=skip_bad
    )
    meta = {
        "model_digest": embedder.model_digest,
        "model_ref": embedder.ref,
        "image_size": image_size,
        "resize_ratio": resize_ratio,
    }
    return Gallery(embeddings, [str(p) for p in kept], meta, ", ".join(str(s) for s in sources), skipped)


def _recorded_model(meta: dict[str, Any]) -> str | None:
    """The model an embeddings file names: its ``hf://`` reference, else the folder that embedded it (a run
    folder's reference resolves to the checkpoint it stood for then, e.g. ``RUN/last``), else the reference."""
    ref = meta.get("model_ref")
    if ref and str(ref).startswith("hf://"):
        return str(ref)
    checkpoint = meta.get("checkpoint")
    if checkpoint and Path(checkpoint).exists():
        return str(checkpoint)
    return ref or checkpoint


def folder_label(path: str) -> str:
    """The class of an image laid out as ``<class>/<image>``: its parent folder's name."""
    return Path(path).parent.name


def _neighbours(
    query_embeddings: Tensor,
    gallery: Gallery,
    query_paths: list[str],
    k: int,
    metric: str,
    backend: str,
    include_self: bool,
) -> list[list[tuple[int, float]]]:

    size = gallery.embeddings.shape[0]
    if k < 1:
        raise ConfigError(f"-k must be a positive integer, got {k}")
    if k > size:
        raise ConfigError(f"-k {k} neighbours requested but the gallery holds only {size} images")
    position = {} if include_self else {_key(p): i for i, p in enumerate(gallery.paths)}
    own = [position.get(_key(p)) for p in query_paths]
    wanted = min(size, k + int(any(i is not None for i in own)))
    scores, indices = knn(query_embeddings, gallery.embeddings, wanted, metric=metric, backend=backend)
    results = []
    for row, self_index in enumerate(own):
        pairs = [(int(i), float(s)) for s, i in zip(scores[row], indices[row]) if int(i) != self_index]
        results.append(pairs[:k])
    return results


def _key(path: str) -> str:
    return os.path.realpath(path)


def search_images(
    queries: Sequence[str | os.PathLike],
    gallery: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    model: str | None = None,
    k: int = 5,
    metric: str = "cosine",
    backend: str = "torch",
    image_size: int | None = None,
    batch_size: int = 64,
    device: str = "auto",
    labels_from_folders: bool = False,
    include_self: bool = False,
    skip_bad_images: bool = False,
) -> dict[str, Any]:
    """The ``k`` nearest gallery images of each query image.

    Args:
        queries: image files or folders of images.
        gallery: an embeddings file from ``dmlkd embed``, or image files/folders (then ``model`` is required).
        model: checkpoint/run folder, ``hf://`` reference or export folder; for an embeddings file the
            default is the checkpoint recorded in it, and any other model must have the same digest.
        k: neighbours per query.
        metric: ``cosine`` or ``euclidean``; backend: ``torch`` (exact) or ``faiss`` (must be installed).
        image_size: input size; for an embeddings file it must equal the recorded one.
        labels_from_folders: an image's class is its parent folder's name; neighbours get ``match``.
        include_self: keep a query that is itself in the gallery among its own neighbours.

    Returns:
        JSON-ready ``{"model", "gallery", "metric", "backend", "k", "queries": [{"path", "label",
        "neighbours": [{"rank", "path", "score", "label", "match"}]}], "skipped"}``.
    """
    sources = [gallery] if isinstance(gallery, (str, os.PathLike)) else list(gallery)
    from_file = len(sources) == 1 and is_embeddings_file(sources[0])
    if from_file:
        loaded = load_gallery_file(sources[0])
        ref = model or _recorded_model(loaded.meta)
        if not ref:
            raise DataError(f"embeddings file {str(sources[0])!r} does not name its model; pass --model")
        embedder = load_embedder(ref, device=device)
        check_same_model(loaded.meta, embedder, loaded.source)
        recorded = loaded.meta.get("image_size")
        if image_size is not None and recorded is not None and image_size != recorded:
            raise ConfigError(
                f"--image-size {image_size} differs from the {recorded} that {loaded.source!r} was embedded at"
            )
        size = checked_image_size(embedder, image_size or recorded)
        resize_ratio = loaded.meta.get("resize_ratio", DEFAULT_RESIZE_RATIO)
    else:
        if model is None:
            raise ConfigError("a gallery of image files needs --model (the checkpoint or export to embed them with)")
        embedder = load_embedder(model, device=device)
        size, resize_ratio = checked_image_size(embedder, image_size), DEFAULT_RESIZE_RATIO
        loaded = embed_gallery(sources, embedder, size, resize_ratio, batch_size, skip_bad_images)
    query_embeddings, kept, skipped = embed_files(
        embedder, expand_image_paths(queries), size, resize_ratio, batch_size, skip_bad=skip_bad_images
    )
    query_paths = [str(p) for p in kept]
    found = _neighbours(query_embeddings, loaded, query_paths, k, metric, backend, include_self)
    return {
        "model": embedder.describe(),
        "gallery": {"source": loaded.source, "size": len(loaded.paths), "image_size": size},
        "metric": metric,
        "backend": "faiss" if backend == "faiss" else "torch",
        "k": k,
        "queries": [_query_row(p, pairs, loaded.paths, labels_from_folders) for p, pairs in zip(query_paths, found)],
        "skipped": [path for path, _ in loaded.skipped + skipped],
    }


def _query_row(path: str, pairs: list[tuple[int, float]], gallery_paths: list[str], labels: bool) -> dict[str, Any]:
    label = folder_label(path) if labels else None
    neighbours = []
    for rank, (index, score) in enumerate(pairs, start=1):
        other = folder_label(gallery_paths[index]) if labels else None
        neighbours.append(
            {
                "rank": rank,
                "path": gallery_paths[index],
                "score": round(score, 6),
                "label": other,
                "match": None if label is None else other == label,
            }
        )
    return {"path": path, "label": label, "neighbours": neighbours}


def format_results(result: dict[str, Any]) -> str:
    """Plain text: one block per query, one ``rank score path [label]`` line per neighbour."""
    lines = [
        f"model {result['model']['ref']} ({result['model']['kind']}, {result['model']['spec']}; "
        f"{result['model']['checkpoint']}: {result['model'].get('checkpoint_note') or 'checkpoint'}); gallery "
        f"{result['gallery']['source']} ({result['gallery']['size']} images); {result['metric']}, "
        f"{result['backend']}"
    ]
    for query in result["queries"]:
        label = f"  [{query['label']}]" if query["label"] is not None else ""
        lines.append(f"query {query['path']}{label}")
        for item in query["neighbours"]:
            mark = "" if item["match"] is None else ("  ok" if item["match"] else "  x")
            tag = f"  [{item['label']}]" if item["label"] is not None else ""
            lines.append(f"  {item['rank']:>3}  {item['score']:+.4f}  {item['path']}{tag}{mark}")
    return "\n".join(lines)
