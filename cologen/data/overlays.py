"""Grounding targets: the scene with an overlay drawn on the referred object(s), in a named colour.

Kinds: `box` (an outline around the object), `mask` (the object's pixels painted), `class_boxes` (an
outline around every instance of the object's class). The default colours are absent from ShapeWorld's
object and background palettes, so the colour in the prompt is never ambiguous.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

OVERLAY_KINDS: tuple[str, ...] = ("box", "mask", "class_boxes")
DEFAULT_OVERLAY_COLORS: dict[str, tuple[int, int, int]] = {
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
}


def box_thickness(width: int, height: int) -> int:
    """1 px at 32 px, growing with the image so boxes stay visible after the latent downsampling."""
    return max(1, round(min(width, height) / 64))


def draw_box(img: np.ndarray, box: Sequence[int], rgb: Sequence[int], thickness: int = 1) -> None:
    """Outline the pixels just inside `box` ([x0, y0, x1, y1], x1/y1 exclusive), in place."""
    x0, y0, x1, y1 = (int(v) for v in box)
    t = max(1, min(thickness, (x1 - x0 + 1) // 2, (y1 - y0 + 1) // 2))
    color = np.asarray(rgb, np.uint8)
    img[y0:y0 + t, x0:x1] = color
    img[y1 - t:y1, x0:x1] = color
    img[y0:y1, x0:x0 + t] = color
    img[y0:y1, x1 - t:x1] = color


def paint_mask(img: np.ndarray, mask: np.ndarray, rgb: Sequence[int], alpha: float = 1.0) -> None:
    """Blend `rgb` over the mask's pixels with opacity `alpha`, in place."""
    sel = mask.astype(bool)
    color = np.asarray(rgb, np.float32)
    img[sel] = np.clip(img[sel].astype(np.float32) * (1 - alpha) + color * alpha + 0.5, 0, 255).astype(np.uint8)
