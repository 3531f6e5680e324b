"""Image grids of validation probes: one column per probe, rows source | output | ground truth, and under each
column the probe's prompt (the instruction of an editing or grounding probe) and its scores."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cologen.metrics.images import ImageLike, to_uint8_rgb

ROW_NAMES = ("source", "output", "target")
PAD = 2
LABEL_W = 52
LINE_H = 12  # caption line height of PIL's default font (size 10)
MAX_PROMPT_LINES = 6


def display_scale(side: int, min_side: int = 128) -> int:
    """Integer nearest-neighbour upscale so a tiny (32 px) image is big enough to look at."""
    return max(1, -(-min_side // max(side, 1)))


def _cell(image: ImageLike | None, size: tuple[int, int]) -> Image.Image:
    if image is None:  # a probe without a condition image
        return Image.new("RGB", size, (200, 200, 200))
    return Image.fromarray(to_uint8_rgb(image)).resize(size, Image.NEAREST)


def wrap(text: str, width: float, font: ImageFont.ImageFont) -> list[str]:
    """Greedy word wrap to `width` pixels (a word longer than the width is cut)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}".strip()
            if font.getlength(candidate) <= width or not line:
                line = candidate
            else:
                lines.append(line)
                line = word
            while font.getlength(line) > width and len(line) > 1:  # one very long word
                cut = max(1, int(len(line) * width / font.getlength(line)))
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return lines


def probe_caption(prompt: str, scores: Mapping[str, float] | None = None, limit: int = 4) -> str:
    """A column's caption: the prompt, then up to `limit` of its scores (`metric value`, one per line)."""
    lines = [prompt]
    for key, value in list((scores or {}).items())[:limit]:
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            lines.append(f"{key.rsplit('/', 1)[-1]} {float(value):.3g}")
    return "\n".join(lines)


def probe_grid(sources: Sequence[ImageLike | None], outputs: Sequence[ImageLike],
               targets: Sequence[ImageLike], min_side: int = 128,
               captions: Sequence[str] | None = None) -> np.ndarray:
    """uint8 H x W x 3: rows source | output | target (ground truth), probes left to right (`image_grid`)."""
    if not (len(sources) == len(outputs) == len(targets)) or not outputs:
        raise ValueError(f"need as many sources, outputs and targets (>= 1), got {len(sources)}, "
                         f"{len(outputs)}, {len(targets)}")
    return image_grid(list(zip(ROW_NAMES, (sources, outputs, targets))), min_side, captions)


def image_grid(rows: Sequence[tuple[str, Sequence[ImageLike | None]]], min_side: int = 128,
               captions: Sequence[str] | None = None) -> np.ndarray:
    """uint8 H x W x 3: one labelled row per (name, images), columns left to right, every cell at the size of the
    last row's first image x the upscale (None: a grey cell); with `captions` (one per column: `probe_caption`),
    each is written under its column (the first line wrapped to the column, at most MAX_PROMPT_LINES lines, then
    the other lines)."""
    columns = len(rows[0][1]) if rows else 0
    if not columns or any(len(images) != columns for _, images in rows):
        raise ValueError(f"need rows of the same length (>= 1), got {[len(images) for _, images in rows]}")
    if captions is not None and len(captions) != columns:
        raise ValueError(f"need one caption per column, got {len(captions)} for {columns}")
    h, w = to_uint8_rgb(rows[-1][1][0]).shape[:2]
    scale = display_scale(max(h, w), min_side)
    cw, ch = w * scale, h * scale
    font = ImageFont.load_default()
    wrapped = []
    for text in captions or []:
        prompt, _, scores = text.partition("\n")
        lines = wrap(prompt, cw - 2, font)
        if len(lines) > MAX_PROMPT_LINES:
            lines = lines[:MAX_PROMPT_LINES - 1] + [lines[MAX_PROMPT_LINES - 1].rstrip() + " ..."]
        wrapped.append(lines + (scores.split("\n") if scores else []))
    caption_h = (max(len(lines) for lines in wrapped) * LINE_H + 2 * PAD) if wrapped else 0
    grid = Image.new("RGB", (LABEL_W + columns * (cw + PAD) + PAD, len(rows) * (ch + PAD) + PAD + caption_h),
                     (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (name, row) in enumerate(rows):
        y = PAD + r * (ch + PAD)
        draw.text((4, y + ch // 2 - 5), name, fill=(0, 0, 0))
        for c, image in enumerate(row):
            grid.paste(_cell(image, (cw, ch)), (LABEL_W + PAD + c * (cw + PAD), y))
    if wrapped:
        y0 = len(rows) * (ch + PAD) + PAD
        draw.text((4, y0), "prompt", fill=(0, 0, 0))
        for c, lines in enumerate(wrapped):
            x = LABEL_W + PAD + c * (cw + PAD) + 1
            for i, line in enumerate(lines):
                draw.text((x, y0 + i * LINE_H), line, fill=(0, 0, 0), font=font)
    return np.asarray(grid)
