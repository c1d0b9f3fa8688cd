"""The report's retrieval grid as one PNG: each row a query and its nearest neighbours, framed by correctness.

The thumbnails and frames are composed into one picture (``retrieval_mosaic``) and the captions are written
above the images with Pillow in matplotlib's font (DejaVu Sans): one matplotlib subplot per image took about
2 s per report.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFont

THUMBNAIL = 160  # pixels of the longer side of a retrieval-grid image
FRAME = 4  # pixels of the coloured frame around each retrieval-grid image
CAPTION_BAND = 30  # pixels above each retrieval-grid image for its caption (two lines of 7 pt text)
GAP = 8  # pixels between neighbouring retrieval-grid cells
CELL_WIDTH = THUMBNAIL + 2 * FRAME + GAP
CELL_HEIGHT = CAPTION_BAND + THUMBNAIL + 2 * FRAME + GAP
TITLE_BAND = 30  # pixels above the retrieval grid for its title
CAPTION_PIXELS, TITLE_PIXELS = 10, 14  # font sizes (7 and 10 pt at 100 dpi)
CORRECT_COLOR = "#2ca02c"
WRONG_COLOR = "#d62728"
QUERY_COLOR = "#1f77b4"


@dataclass
class GridRow:
    """One query of the retrieval grid: its position and label, its neighbours' positions and labels."""

    query: int
    query_label: int
    neighbours: list[int]
    neighbour_labels: list[int]


def plot_retrieval_grid(
    rows: Sequence[GridRow],
    load_query: Callable[[int], Image.Image],
    load_gallery: Callable[[int], Image.Image],
    path: Path,
    title: str = "",
    class_name: Callable[[int], str] = str,
    row_labels: Sequence[str] | None = None,
) -> Path:
    """A grid: each row a query (blue frame) and its nearest neighbours, green frame if correct, red if not.

    Args:
        rows: the queries and their ranked neighbours (all rows have at most the same number of neighbours).
        load_query, load_gallery: positions → PIL images (the same function for leave-one-out retrieval).
        path: the PNG to write.
        title: the figure title (e.g. which model ranked the neighbours).
        class_name: label → the name shown in the captions (a glyph's character; the number by default).
        row_labels: per row, the model that ranked it (shown above the query).
    """
    cells: list[list[tuple[Image.Image, str, str]]] = []
    for r, row in enumerate(rows):
        who = f"{row_labels[r]}\n" if row_labels else ""
        line = [(load_query(row.query), QUERY_COLOR, f"{who}query: {class_name(row.query_label)}")]
        for c, (position, label) in enumerate(zip(row.neighbours, row.neighbour_labels), start=1):
            color = CORRECT_COLOR if label == row.query_label else WRONG_COLOR
            line.append((load_gallery(position), color, f"#{c}: {class_name(label)}"))
        cells.append(line)
    top = TITLE_BAND if title else 0
    mosaic = retrieval_mosaic([[(image, color) for image, color, _ in line] for line in cells], top)
    picture = Image.fromarray(mosaic)
    draw = ImageDraw.Draw(picture)
    small, large = _font(CAPTION_PIXELS), _font(TITLE_PIXELS)
    for r, line in enumerate(cells):
        for c, (_, color, caption) in enumerate(line):
            x, y = _cell_origin(r, c, top)
            for back, words in enumerate(reversed(caption.splitlines())):  # the last line sits on the image
                baseline = y + CAPTION_BAND - 4 - back * (CAPTION_PIXELS + 2)
                draw.text((x + CELL_WIDTH / 2, baseline), words, fill=color, font=small, anchor="ms")
    if title:
        draw.text((picture.width / 2, top / 2), title, fill="black", font=large, anchor="mm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")
    return path


def _font(pixels: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """matplotlib's DejaVu Sans (the other figures' font) at ``pixels``; Pillow's own font if it is missing."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    return ImageFont.truetype(str(path), pixels) if path.is_file() else ImageFont.load_default(pixels)


def _cell_origin(row: int, column: int, top: int) -> tuple[int, int]:
    """Pixel ``(x, y)`` of a retrieval-grid cell's top-left corner (its caption band comes first)."""
    return column * CELL_WIDTH, top + row * CELL_HEIGHT


def retrieval_mosaic(cells: Sequence[Sequence[tuple[Image.Image, str]]], top: int = 0) -> np.ndarray:
    """``(H, W, 3)`` uint8: row ``r``, column ``c`` holds ``cells[r][c]``'s image scaled to fit a
    ``THUMBNAIL``-pixel square, centred in it, framed ``FRAME`` pixels wide in the cell's colour, below a
    ``CAPTION_BAND`` of white; ``top`` white rows first (the title's band)."""
    columns = max((len(line) for line in cells), default=0) or 1
    canvas = np.full((top + CELL_HEIGHT * max(len(cells), 1), CELL_WIDTH * columns, 3), 255, np.uint8)
    for r, line in enumerate(cells):
        for c, (image, color) in enumerate(line):
            x, y = _cell_origin(r, c, top)
            picture = _fitted(image)
            width, height = picture.size
            left = x + GAP // 2 + FRAME + (THUMBNAIL - width) // 2
            upper = y + CAPTION_BAND + FRAME + (THUMBNAIL - height) // 2
            frame = ImageColor.getrgb(color)
            canvas[upper - FRAME : upper + height + FRAME, left - FRAME : left + width + FRAME] = frame
            canvas[upper : upper + height, left : left + width] = np.asarray(picture)
    return canvas


def _fitted(image: Image.Image) -> Image.Image:
    """``image`` in RGB, scaled (up or down, aspect kept) so that its longer side is ``THUMBNAIL`` pixels."""
    image = image.convert("RGB")
    scale = THUMBNAIL / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)
