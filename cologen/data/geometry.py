"""Resize and crop a sample from its stored frame to the output frame, and map boxes and polygons along.

The output frame is either a fixed square (`resolution`, the tiny preset) or, with aspect-ratio buckets
(the FLUX preset), the bucket whose aspect ratio is nearest the image's. Images are scaled to cover the
frame and centre-cropped, so nothing is stretched.
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
    """Rasterise polygons given in continuous coordinates (pixel i covers [i, i+1)) into a 0/1 mask."""
    mask = np.zeros((height, width), np.uint8)
    pts = [np.round((p - 0.5) * 16).astype(np.int32) for p in polygons if len(p) >= 3]
    if pts:
        cv2.fillPoly(mask, pts, 1, lineType=cv2.LINE_8, shift=4)
    return mask
