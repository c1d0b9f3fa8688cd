"""Pictures of search results: a PNG grid and a self-contained HTML page (``dmlkd search --grid/--html``).

One row per query: the query (blue frame) then its neighbours in rank order. When labels are known a
neighbour of the query's class gets a green frame, any other a red one; without labels frames are grey. The
HTML page embeds every thumbnail as a base64 data URI and holds no script and no external reference, so it
opens offline, from an e-mail attachment or a CI artefact.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

QUERY_COLOR = (33, 102, 172)
MATCH_COLOR = (46, 125, 50)
MISS_COLOR = (198, 40, 40)
UNKNOWN_COLOR = (150, 150, 150)
FRAME = 4


def frame_color(item: dict[str, Any] | None) -> tuple[int, int, int]:
    """Blue for a query (``None``), green/red for a neighbour that does/does not share its label, else grey."""
    if item is None:
        return QUERY_COLOR
    if item.get("match") is None:
        return UNKNOWN_COLOR
    return MATCH_COLOR if item["match"] else MISS_COLOR


def thumbnail(path: str, size: int) -> Image.Image:
    """The image fitted into ``size`` x ``size`` (aspect kept, centred on white); a grey tile if unreadable."""
    tile = Image.new("RGB", (size, size), (255, 255, 255))
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = size / max(image.width, image.height)  # small images are enlarged too
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    except OSError:
        return Image.new("RGB", (size, size), (200, 200, 200))
    tile.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return tile


def _framed(path: str, size: int, color: tuple[int, int, int]) -> Image.Image:
    tile = Image.new("RGB", (size + 2 * FRAME, size + 2 * FRAME), color)
    tile.paste(thumbnail(path, size), (FRAME, FRAME))
    return tile


def _write_atomically(target: Path, data: bytes) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def write_grid(result: dict[str, Any], out: str | os.PathLike, size: int = 96) -> Path:
    """A PNG with one row per query: query, then its neighbours with rank and score under each."""
    columns = 1 + max((len(q["neighbours"]) for q in result["queries"]), default=0)
    cell_w, cell_h = size + 2 * FRAME + 6, size + 2 * FRAME + 18
    canvas = Image.new("RGB", (columns * cell_w, max(1, len(result["queries"])) * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for row, query in enumerate(result["queries"]):
        top = row * cell_h
        canvas.paste(_framed(query["path"], size, frame_color(None)), (0, top))
        draw.text((2, top + size + 2 * FRAME + 2), _short(query["label"] or Path(query["path"]).name), fill=(0, 0, 0))
        for item in query["neighbours"]:
            left = item["rank"] * cell_w
            canvas.paste(_framed(item["path"], size, frame_color(item)), (left, top))
            draw.text((left + 2, top + size + 2 * FRAME + 2), f"{item['rank']}: {item['score']:.3f}", fill=(0, 0, 0))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return _write_atomically(Path(out), buffer.getvalue())


def _short(text: str, limit: int = 14) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "~"


def _data_uri(path: str, size: int) -> str:
    buffer = io.BytesIO()
    thumbnail(path, size).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_STYLE = """
body { font-family: sans-serif; margin: 1em; color: #222; }
table { border-collapse: separate; border-spacing: 6px; }
td { vertical-align: top; text-align: center; font-size: 12px; }
img.thumb { display: block; border: 4px solid #969696; }
td.query img.thumb { border-color: rgb(33, 102, 172); }
td.match img.thumb { border-color: rgb(46, 125, 50); }
td.miss img.thumb { border-color: rgb(198, 40, 40); }
.path { max-width: 140px; overflow-wrap: anywhere; color: #555; }
"""


def _cell(kind: str, path: str, caption: str, size: int, attributes: str = "") -> str:
    return (
        f'<td class="{kind}" data-path="{html.escape(path)}"{attributes}>'
        f'<img class="thumb" width="{size}" height="{size}" alt="{html.escape(Path(path).name)}" '
        f'src="{_data_uri(path, size)}"><div>{caption}</div><div class="path">{html.escape(path)}</div></td>'
    )


def _neighbour_kind(item: dict[str, Any]) -> str:
    return "unknown" if item["match"] is None else ("match" if item["match"] else "miss")


def render_html(result: dict[str, Any], size: int = 128) -> str:
    """The page as a string: a header naming model, gallery and metric, then one table row per query."""
    model, gallery = result["model"], result["gallery"]
    rows = []
    for query in result["queries"]:
        label = html.escape(query["label"]) if query["label"] is not None else "query"
        cells = [_cell("query", query["path"], f"<b>{label}</b>", size)]
        for item in query["neighbours"]:
            tag = f" &middot; {html.escape(item['label'])}" if item["label"] is not None else ""
            caption = f"#{item['rank']} &middot; {item['score']:.4f}{tag}"
            cells.append(_cell(_neighbour_kind(item), item["path"], caption, size, f' data-rank="{item["rank"]}"'))
        rows.append(f'<tr class="result" data-query="{html.escape(query["path"])}">{"".join(cells)}</tr>')
    header = (
        f"model <code>{html.escape(model['ref'])}</code> ({html.escape(model['kind'])}, "
        f"{html.escape(model['spec'])}) &middot; gallery <code>{html.escape(gallery['source'])}</code> "
        f"({gallery['size']} images) &middot; {html.escape(result['metric'])}, top {result['k']}"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>dmlkd search</title>'
        f"<style>{_STYLE}</style></head>\n<body>\n<h1>dmlkd search</h1>\n<p>{header}</p>\n"
        f'<table id="results">\n{chr(10).join(rows)}\n</table>\n</body></html>\n'
    )


def write_html(result: dict[str, Any], out: str | os.PathLike, size: int = 128) -> Path:
    """Write ``render_html(result)`` to ``out`` (atomically)."""
    return _write_atomically(Path(out), render_html(result, size).encode("utf-8"))
