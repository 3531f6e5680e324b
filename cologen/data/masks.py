"""Inpainting masks in the paper's three kinds: random, object-shaped and irregular.

* random: a box or a few brush strokes, redrawn (smaller each time) while its IoU with any object
  exceeds `max_iou`, so it never just cuts one object out;
* object: the visible pixels of one object, slightly dilated;
* irregular: a closed curve through `n_points` points sampled on a closed Bezier curve fitted to one
  object's box (on-curve points at the edge midpoints, control points at the corners), radially jittered.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from cologen.data.geometry import fill_polygons
from cologen.data.records import BadSample

MASK_KINDS: tuple[str, ...] = ("random", "object", "irregular")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def random_mask(rng: np.random.Generator, width: int, height: int, objects: Sequence[np.ndarray],
                max_iou: float = 0.3, tries: int = 100) -> tuple[np.ndarray, dict]:
    """A box or brush-stroke mask with IoU <= max_iou against every object mask."""
    scale = 1.0
    for attempt in range(tries):
        mask = np.zeros((height, width), np.uint8)
        if rng.random() < 0.5:
            shape = "box"
            bw = max(1, int(round(rng.uniform(0.25, 0.6) * width * scale)))
            bh = max(1, int(round(rng.uniform(0.25, 0.6) * height * scale)))
            x0, y0 = int(rng.integers(0, width - bw + 1)), int(rng.integers(0, height - bh + 1))
            mask[y0:y0 + bh, x0:x0 + bw] = 1
        else:
            shape = "strokes"
            for _ in range(int(rng.integers(1, 4))):
                n = int(rng.integers(2, 5))
                pts = np.stack([rng.uniform(0, width, n), rng.uniform(0, height, n)], 1).astype(np.int32)
                thick = max(1, int(round(rng.uniform(0.06, 0.15) * width * scale)))
                cv2.polylines(mask, [pts], False, 1, thickness=thick)
        if mask.any() and all(iou(mask, o) <= max_iou for o in objects):
            return mask, {"shape": shape, "attempts": attempt + 1}
        scale *= 0.95
    raise BadSample("build", f"no random mask with IoU <= {max_iou} to the objects in {tries} tries")


def object_shaped_mask(rng: np.random.Generator, obj_mask: np.ndarray, max_dilate: int = 1) -> np.ndarray:
    d = int(rng.integers(0, max_dilate + 1))
    if d == 0:
        return obj_mask.astype(np.uint8).copy()
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * d + 1, 2 * d + 1))
    return cv2.dilate(obj_mask.astype(np.uint8), kernel)


def bezier_box_points(rng: np.random.Generator, box: Sequence[float], n_points: int = 20,
                      margin: float = 0.15, jitter: float = 0.15) -> np.ndarray:
    """`n_points` points, in order, on a jittered closed quadratic Bezier curve fitted to `box`."""
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    hw, hh = (x1 - x0) / 2 * (1 + margin), (y1 - y0) / 2 * (1 + margin)
    half = np.array([hw, hh])
    mids = np.array([[cx, cy - hh], [cx + hw, cy], [cx, cy + hh], [cx - hw, cy]])
    corners = np.array([[cx + hw, cy - hh], [cx + hw, cy + hh], [cx - hw, cy + hh], [cx - hw, cy - hh]])
    mids = mids + rng.uniform(-jitter / 2, jitter / 2, (4, 2)) * half
    corners = corners + rng.uniform(-jitter, jitter, (4, 2)) * half
    t = (np.arange(n_points) + rng.uniform(0, 1)) * (4.0 / n_points)  # evenly spread, random phase
    seg, u = np.floor(t).astype(int) % 4, (t - np.floor(t))[:, None]
    p0, c, p1 = mids[seg], corners[seg], mids[(seg + 1) % 4]
    pts = (1 - u) ** 2 * p0 + 2 * (1 - u) * u * c + u**2 * p1
    centre = np.array([cx, cy])
    radial = rng.uniform(1 - jitter, 1 + jitter, (n_points, 1))  # same angle, new radius: stays simple
    return centre + (pts - centre) * radial


def irregular_mask(rng: np.random.Generator, box: Sequence[float], width: int, height: int,
                   n_points: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """The filled closed curve through the Bezier points, clipped to the image; returns (mask, points)."""
    pts = bezier_box_points(rng, box, n_points)
    pts[:, 0] = np.clip(pts[:, 0], 0, width)
    pts[:, 1] = np.clip(pts[:, 1], 0, height)
    mask = fill_polygons([pts], width, height)
    if not mask.any():
        raise BadSample("build", f"irregular mask of box {list(box)} is empty")
    return mask, pts
