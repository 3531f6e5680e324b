"""COCO-format helpers: the one place where dataset box conventions become the project's.

Project convention (docs/data.md): `[x0, y0, x1, y1]`, integer pixels of the stored image, `x1`/`y1`
exclusive. COCO boxes are continuous `[x, y, w, h]`; `xywh_to_box` takes the smallest integer box that
covers the continuous one (floor the start, ceil the end), clipped to the image.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_recipes._rows import Skip

log = logging.getLogger("data_recipes")

# The 80 COCO detection classes by their (non-contiguous) category id; RefCOCO tables carry only the id.
COCO_NAMES: dict[int, str] = dict(enumerate([
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "", "backpack", "umbrella", "", "", "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
    "surfboard", "tennis racket", "bottle", "", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana",
    "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "", "dining table", "", "", "toilet", "", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush"], start=1))
COCO_NAMES = {k: v for k, v in COCO_NAMES.items() if v}

_EPS = 1e-6  # float noise in published boxes must not grow a box by a whole pixel


def xywh_to_box(bbox: Sequence[float] | None, width: int, height: int, min_inside: float = 0.5) -> list[int]:
    """COCO `[x, y, w, h]` -> `[x0, y0, x1, y1]` (exclusive), clipped to the image.

    Skip("box outside the image") when less than `min_inside` of the box's area lies inside the image.
    """
    if bbox is None or len(bbox) < 4:
        raise Skip("missing box")
    x, y, w, h = (float(v) for v in bbox[:4])
    return xyxy_to_box((x, y, x + w, y + h), width, height, min_inside)


def xyxy_to_box(corners: Sequence[float], width: int, height: int, min_inside: float = 0.5) -> list[int]:
    """Continuous `(x0, y0, x1, y1)` -> integer exclusive box, clipped; see `xywh_to_box`."""
    x0, y0, x1, y1 = (float(v) for v in corners[:4])
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        raise Skip("degenerate box")
    bx0, by0 = math.floor(x0 + _EPS), math.floor(y0 + _EPS)
    bx1, by1 = math.ceil(x1 - _EPS), math.ceil(y1 - _EPS)
    cx0, cy0, cx1, cy1 = max(bx0, 0), max(by0, 0), min(bx1, width), min(by1, height)
    if cx1 <= cx0 or cy1 <= cy0:
        raise Skip("box outside the image")
    if (cx1 - cx0) * (cy1 - cy0) < min_inside * (bx1 - bx0) * (by1 - by0):
        raise Skip("box outside the image")
    return [cx0, cy0, cx1, cy1]


def clean_polygons(segmentation: Any, width: int, height: int) -> list[list[float]]:
    """COCO polygon lists (one flat `[x, y, ...]` per part) clipped to the image; RLEs give `[]`."""
    if not isinstance(segmentation, list):
        return []
    parts = segmentation
    if parts and not isinstance(parts[0], list):  # a single flat polygon (lmms-lab tables)
        parts = [parts]
    out = []
    for part in parts:
        if part is None or len(part) < 6:
            continue
        xy = np.asarray(part[: len(part) // 2 * 2], dtype=np.float64).reshape(-1, 2)
        xy[:, 0] = xy[:, 0].clip(0, width)
        xy[:, 1] = xy[:, 1].clip(0, height)
        out.append([round(float(v), 2) for v in xy.reshape(-1)])
    return out


def _rle_counts_from_string(s: str) -> list[int]:
    """COCO's compressed RLE string (pycocotools `rleFrString`): 5-bit groups, deltas from counts[i-2]."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """A COCO RLE (compressed string or uncompressed list counts) -> bool mask (H, W)."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        counts = _rle_counts_from_string(counts)
    flat = np.zeros(h * w, dtype=bool)
    pos, value = 0, False
    for c in counts:
        if value:
            flat[pos: pos + c] = True
        pos += c
        value = not value
    return flat.reshape((w, h)).T  # RLE runs go down columns (Fortran order)


def polygon_mask(polygon: Sequence[float], width: int, height: int) -> np.ndarray:
    """One flat polygon in continuous coordinates -> bool mask (H, W): a pixel is in when its centre is.

    Even-odd scanline fill at pixel centres, half-open like the boxes ([x0, x1) along each row), so a
    polygon and its box agree to the pixel; OpenCV's fill includes both edges and would grow it by one.
    """
    mask = np.zeros((height, width), bool)
    xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    if len(xy) < 3:
        return mask
    x0, y0 = xy[:, 0], xy[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    lo, hi = max(math.floor(y0.min()), 0), min(math.ceil(y0.max()), height)
    if hi <= lo:
        return mask
    yc = np.arange(lo, hi, dtype=np.float64)[:, None] + 0.5
    crosses = ((y0 <= yc) & (yc < y1)) | ((y1 <= yc) & (yc < y0))
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = x0 + (yc - y0) * (x1 - x0) / (y1 - y0)
    rows, edges = np.nonzero(crosses)
    # Each crossing toggles inside/outside from the first pixel whose centre is at or right of it.
    cols = np.clip(np.ceil(xs[rows, edges] - 0.5), 0, width).astype(np.int64)
    toggles = np.zeros((hi - lo, width + 1), np.int32)
    np.add.at(toggles, (rows, cols), 1)
    mask[lo:hi] = (np.cumsum(toggles, axis=1)[:, :width] % 2).astype(bool)
    return mask


def segmentation_mask(segmentation: Any, width: int, height: int) -> np.ndarray:
    """Any COCO segmentation (polygon parts, united, or an RLE) -> bool mask (H, W)."""
    if isinstance(segmentation, dict) and "counts" in segmentation:
        mask = rle_to_mask(segmentation)
        if mask.shape != (height, width):
            raise Skip("RLE size differs from image")
        return mask
    mask = np.zeros((height, width), bool)
    for poly in clean_polygons(segmentation, width, height):
        mask |= polygon_mask(poly, width, height)
    return mask


class CocoIndex:
    """COCO-format JSON files (merged by image id): images, annotations per image, category names."""

    def __init__(self, data: Sequence[dict[str, Any]]):
        self.images: dict[int, dict[str, Any]] = {}
        self.categories: dict[int, dict[str, Any]] = {}
        self.anns: dict[int, list[dict[str, Any]]] = defaultdict(list)
        orphans = 0
        for d in data:
            for im in d.get("images", []):
                self.images.setdefault(im["id"], im)
            for c in d.get("categories", []):
                self.categories.setdefault(c["id"], c)
        for d in data:
            for a in d.get("annotations", []):
                if a.get("image_id") in self.images:
                    self.anns[a["image_id"]].append(a)
                else:
                    orphans += 1
        if orphans:
            log.warning("%d annotations refer to images not in the JSON; ignored", orphans)
        self.image_ids = sorted(self.images)

    @classmethod
    def load(cls, paths: Sequence[Path]) -> CocoIndex:
        return cls([json.loads(Path(p).read_text()) for p in paths])

    def category_name(self, cat_id: int) -> str:
        c = self.categories.get(cat_id)
        return c["name"].replace("_", " ") if c else COCO_NAMES.get(cat_id, str(cat_id))


def image_file_name(image: dict[str, Any]) -> str:
    """COCO gives `file_name`; LVIS v1 gives only `coco_url` (whose last part is the COCO 2017 file name)."""
    if image.get("file_name"):
        return str(image["file_name"])
    if image.get("coco_url"):
        return str(image["coco_url"]).rsplit("/", 1)[-1]
    raise Skip("image has no file name")


def find_image(root: Path, relative: str, subfolders: Sequence[str] = ()) -> Path:
    """`root/relative`, else the base name directly in `root` or in one of `subfolders` of it."""
    name = Path(relative).name
    for candidate in [root / relative, root / name] + [root / s / name for s in subfolders]:
        if candidate.is_file():
            return candidate
    raise Skip("image file not found")
