"""Image grids of validation probes: one column per probe, rows source | output | ground truth."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from cologen.metrics.images import ImageLike, to_uint8_rgb

ROW_NAMES = ("source", "output", "target")
PAD = 2
LABEL_W = 52


def display_scale(side: int, min_side: int = 128) -> int:
    """Integer nearest-neighbour upscale so a tiny (32 px) image is big enough to look at."""
    return max(1, -(-min_side // max(side, 1)))


def _cell(image: ImageLike | None, size: tuple[int, int]) -> Image.Image:
    if image is None:  # a probe without a condition image
        return Image.new("RGB", size, (200, 200, 200))
    return Image.fromarray(to_uint8_rgb(image)).resize(size, Image.NEAREST)


def probe_grid(sources: Sequence[ImageLike | None], outputs: Sequence[ImageLike],
               targets: Sequence[ImageLike], min_side: int = 128) -> np.ndarray:
    """uint8 H x W x 3: a labelled grid, probes left to right, every cell at the target's size x the upscale."""
    if not (len(sources) == len(outputs) == len(targets)) or not outputs:
        raise ValueError(f"need as many sources, outputs and targets (>= 1), got {len(sources)}, "
                         f"{len(outputs)}, {len(targets)}")
    h, w = to_uint8_rgb(targets[0]).shape[:2]
    scale = display_scale(max(h, w), min_side)
    cw, ch = w * scale, h * scale
    grid = Image.new("RGB", (LABEL_W + len(outputs) * (cw + PAD) + PAD, len(ROW_NAMES) * (ch + PAD) + PAD),
                     (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (name, row) in enumerate(zip(ROW_NAMES, (sources, outputs, targets))):
        y = PAD + r * (ch + PAD)
        draw.text((4, y + ch // 2 - 5), name, fill=(0, 0, 0))
        for c, image in enumerate(row):
            grid.paste(_cell(image, (cw, ch)), (LABEL_W + PAD + c * (cw + PAD), y))
    return np.asarray(grid)
