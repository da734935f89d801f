"""One picture of many images: the grid behind `python -m shards show`, `python -m loaders.show`
and the trainer's TensorBoard first-batch image.

Pure Pillow, no torch, so shards/ can use it and loaders/ and train/ can import it (imports
point down: train -> loaders -> shards). Callers hand over HxWx3 uint8 arrays or PIL images;
each is fitted into a square cell (aspect kept, centred), with optional caption lines under
it; a marked cell (a repaired or suspect sample) gets a red frame and a red caption.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

BACKGROUND = (24, 24, 24)
CAPTION = (235, 235, 235)
MARK = (230, 40, 40)


def _as_image(x: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(x, Image.Image):
        return x.convert("RGB")
    a = np.asarray(x)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"grid images must be HxWx3 uint8, not {a.dtype} {a.shape}")
    return Image.fromarray(a)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (needs FreeType)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _fit(text: str, font, width: int) -> str:
    """Cut text with an ellipsis so that it fits `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def image_grid(
    images: Sequence[Image.Image | np.ndarray],
    captions: Sequence[str] | None = None,
    marked: Sequence[bool] | None = None,
    *,
    columns: int = 8,
    cell: int | None = None,
    padding: int = 2,
) -> Image.Image:
    """A grid of `images`, `columns` wide; captions may hold several lines ("\\n").

    cell: side of each square cell in pixels (default: the largest image side, so equal-sized
    batch images are shown 1:1).
    """
    if not images:
        raise ValueError("image_grid needs at least one image")
    pics = [_as_image(x) for x in images]
    cell = cell or max(max(p.size) for p in pics)
    columns = max(1, min(columns, len(pics)))
    rows = -(-len(pics) // columns)
    font = _font(max(9, min(14, cell // 11)))
    line_h = int(font.getbbox("Hg")[3]) + 2
    lines = max((c.count("\n") + 1 for c in captions), default=0) if captions else 0
    cap_h = lines * line_h + (2 if lines else 0)
    step_x, step_y = cell + padding, cell + cap_h + padding
    grid = Image.new("RGB", (columns * step_x + padding, rows * step_y + padding), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for i, pic in enumerate(pics):
        x0, y0 = padding + (i % columns) * step_x, padding + (i // columns) * step_y
        if max(pic.size) != cell:
            # Aspect kept; enlarged with NEAREST so the real pixels stay visible, reduced smoothly.
            up = max(pic.size) < cell
            pic = ImageOps.contain(pic, (cell, cell), Image.Resampling.NEAREST if up else Image.Resampling.BICUBIC)
        grid.paste(pic, (x0 + (cell - pic.width) // 2, y0 + (cell - pic.height) // 2))
        is_marked = bool(marked and marked[i])
        if is_marked:
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], outline=MARK, width=max(2, cell // 40))
        if captions:
            for j, text in enumerate(captions[i].split("\n")):
                draw.text(
                    (x0 + 1, y0 + cell + 1 + j * line_h),
                    _fit(text, font, cell - 2),
                    fill=MARK if is_marked else CAPTION,
                    font=font,
                )
    return grid
