"""Resize and crop a sample from its stored frame to the output frame, and map boxes and polygons along.

The output frame is either a fixed square (`resolution`, the tiny preset) or, with aspect-ratio buckets
(the FLUX preset), the bucket whose aspect ratio is nearest the image's. Images are scaled by the least factor
that covers the frame (down, or up for an image smaller than the frame) and centre-cropped, so nothing is
stretched; `box_visible` / `mask_visible` say how much of a region the crop keeps (the builders refuse an
example whose region it loses).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Frame:
    """Maps stored pixels to output pixels: out = in * scale - offset (continuous coordinates)."""

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    width: int
    height: int
    src_width: int
    src_height: int

    @property
    def identity(self) -> bool:
        return (self.src_width, self.src_height) == (self.width, self.height)

    @property
    def crops(self) -> bool:
        """Whether part of the stored image falls outside the output frame."""
        return (round(self.src_width * self.scale_x) > self.width
                or round(self.src_height * self.scale_y) > self.height)

    def window(self) -> tuple[float, float, float, float]:
        """The part of the stored image inside the frame, `(x0, y0, x1, y1)` in stored continuous coordinates."""
        return (max(0.0, self.offset_x / self.scale_x), max(0.0, self.offset_y / self.scale_y),
                min(float(self.src_width), (self.offset_x + self.width) / self.scale_x),
                min(float(self.src_height), (self.offset_y + self.height) / self.scale_y))

    def as_dict(self) -> dict[str, float | int]:
        return {"scale": [self.scale_x, self.scale_y], "offset": [self.offset_x, self.offset_y],
                "size": [self.width, self.height], "stored_size": [self.src_width, self.src_height]}


def make_buckets(resolution: int, multiple: int = 16, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) buckets of about resolution**2 pixels, sides multiples of `multiple`."""
    area, out = resolution * resolution, set()
    for w in range(multiple, int(resolution * math.sqrt(max_ratio)) + multiple, multiple):
        h = max(multiple, int(round(area / w / multiple)) * multiple)
        if 1 / max_ratio <= w / h <= max_ratio:
            out.update({(w, h), (h, w)})  # landscape and portrait alike
    return sorted(out)


def output_size(width: int, height: int, resolution: int, buckets: Sequence[tuple[int, int]] | None) -> tuple[int, int]:
    if not buckets:
        return resolution, resolution
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))


def fit_frame(width: int, height: int, out_w: int, out_h: int) -> Frame:
    """Scale to cover (out_w, out_h) keeping the aspect ratio, then crop the centre."""
    s = max(out_w / width, out_h / height)
    rw, rh = max(out_w, round(width * s)), max(out_h, round(height * s))
    sx, sy = rw / width, rh / height
    return Frame(sx, sy, (rw - out_w) // 2, (rh - out_h) // 2, out_w, out_h, width, height)


def warp(img: np.ndarray, frame: Frame, nearest: bool = False) -> np.ndarray:
    """Resize-and-crop an image or a map of the stored frame; maps (masks, ids) use nearest neighbour."""
    if img.shape[1] == frame.width and img.shape[0] == frame.height and frame.identity:
        return img
    if (img.shape[1], img.shape[0]) != (frame.src_width, frame.src_height):
        frame = fit_frame(img.shape[1], img.shape[0], frame.width, frame.height)  # e.g. a subject reference
    rw, rh = round(frame.src_width * frame.scale_x), round(frame.src_height * frame.scale_y)
    interp = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if frame.scale_x < 1 else cv2.INTER_LINEAR)
    out = cv2.resize(img, (rw, rh), interpolation=interp)
    ox, oy = int(frame.offset_x), int(frame.offset_y)
    return np.ascontiguousarray(out[oy:oy + frame.height, ox:ox + frame.width])


def box_visible(box: Sequence[float], frame: Frame) -> float:
    """The fraction of a stored box's area that lies inside the output frame."""
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    area = (x1 - x0) * (y1 - y0)
    if area <= 0:
        return 0.0
    wx0, wy0, wx1, wy1 = frame.window()
    inside = max(0.0, min(x1, wx1) - max(x0, wx0)) * max(0.0, min(y1, wy1) - max(y0, wy0))
    return inside / area


def mask_visible(mask: np.ndarray, frame: Frame) -> float:
    """The fraction of a stored mask's pixels whose centres land inside the output frame (1 for an empty mask)."""
    h, w = mask.shape[:2]
    if (w, h) != (frame.src_width, frame.src_height):
        frame = fit_frame(w, h, frame.width, frame.height)  # a map of another size (a subject reference)
    total = int(np.count_nonzero(mask))
    if total == 0 or not frame.crops:
        return 1.0
    xs = (np.arange(w) + 0.5) * frame.scale_x - frame.offset_x
    ys = (np.arange(h) + 0.5) * frame.scale_y - frame.offset_y
    cols, rows = (xs >= 0) & (xs < frame.width), (ys >= 0) & (ys < frame.height)
    return int(np.count_nonzero(mask[rows][:, cols])) / total


def map_box(box: Sequence[float], frame: Frame) -> list[int] | None:
    """A stored box in the output frame (integers, x1/y1 exclusive, clipped); None if cropped away."""
    x0 = math.floor(box[0] * frame.scale_x - frame.offset_x)
    y0 = math.floor(box[1] * frame.scale_y - frame.offset_y)
    x1 = math.ceil(box[2] * frame.scale_x - frame.offset_x)
    y1 = math.ceil(box[3] * frame.scale_y - frame.offset_y)
    x0, x1 = max(0, x0), min(frame.width, x1)
    y0, y1 = max(0, y0), min(frame.height, y1)
    return [x0, y0, x1, y1] if x0 < x1 and y0 < y1 else None


def map_polygon(flat: Sequence[float], frame: Frame) -> np.ndarray:
    """A flat [x, y, x, y, ...] stored polygon as an (N, 2) array in output continuous coordinates."""
    pts = np.asarray(flat, np.float64).reshape(-1, 2)
    return pts * [frame.scale_x, frame.scale_y] - [frame.offset_x, frame.offset_y]


def box_of(mask: np.ndarray) -> list[int] | None:
    """Tight [x0, y0, x1, y1] of a mask's nonzero pixels (x1/y1 exclusive), None if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def fill_polygons(polygons: Sequence[np.ndarray], width: int, height: int) -> np.ndarray:
    """Rasterise polygons given in continuous coordinates (pixel i covers [i, i+1)) into a 0/1 mask: a pixel
    is filled when its centre is inside a polygon (even-odd rule; several polygons are united).

    A scanline fill rather than cv2.fillPoly, which also paints the pixels its outline touches and so
    spilled one row and column past the right and bottom edges (past the object's exclusive box)."""
    mask = np.zeros((height, width), np.uint8)
    centres = np.arange(height, dtype=np.float64)[:, None] + 0.5
    for poly in polygons:
        p = np.asarray(poly, np.float64).reshape(-1, 2)
        if len(p) < 3:
            continue
        (x0, y0), (x1, y1) = p.T, np.roll(p, -1, axis=0).T
        crosses = (y0 <= centres) != (y1 <= centres)  # half-open in y: a vertex on a scanline counts once
        with np.errstate(divide="ignore", invalid="ignore"):
            xs = np.where(crosses, x0 + (centres - y0) / (y1 - y0) * (x1 - x0), np.inf)
        xs.sort(axis=1)
        pairs = crosses.sum(1).max() // 2  # crossings per row are even; pair them left to right
        if pairs == 0:
            continue
        starts, ends = xs[:, 0:2 * pairs:2], xs[:, 1:2 * pairs:2]
        valid = np.isfinite(ends)
        # pixel i is inside [a, b) when its centre i + 0.5 is: i in [ceil(a - 0.5), ceil(b - 0.5))
        lo = np.clip(np.ceil(starts[valid] - 0.5), 0, width).astype(np.int64)
        hi = np.clip(np.ceil(ends[valid] - 0.5), 0, width).astype(np.int64)
        rows = np.nonzero(valid)[0]
        diff = np.zeros((height, width + 1), np.int32)
        keep = lo < hi
        np.add.at(diff, (rows[keep], lo[keep]), 1)
        np.add.at(diff, (rows[keep], hi[keep]), -1)
        mask |= (np.cumsum(diff[:, :width], axis=1) > 0).astype(np.uint8)
    return mask
