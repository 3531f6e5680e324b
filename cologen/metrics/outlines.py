"""Rectangles drawn as outlines, recovered from a bool pixel map even where outlines touch or cross.

Connected components merge boxes whose outlines touch or overlap (every instance of a class gets
a box, and instances are often close). Instead, every rectangle whose four sides are drawn is a
candidate, and a greedy cover keeps the fewest rectangles that explain the drawn pixels:

1. Candidate sides: a top edge is a row where a horizontal run (3 or more pixels) has an undrawn
   pixel above it, a bottom edge one with an undrawn pixel below; left / right edges likewise
   from vertical runs. Every (left, top, right, bottom) combination at least 3 x 3 is a
   candidate.
2. A candidate is drawn when at least ``min_coverage`` (95%) of its one-pixel border ring is
   drawn (a rectangle pieced together from parts of two outlines misses more than that).
   Its stroke is the number of nested rings (from the border inwards) that are drawn as well,
   so thick outlines and filled boxes are one rectangle each.
3. Greedy cover: repeatedly keep the candidate whose stroke explains the most pixels not yet
   explained, until none adds ``min_new`` pixels. A spurious rectangle formed by parts of two
   crossing outlines adds nothing once both are kept.

Overlay colour strewn so widely that more than ``MAX_CANDIDATES`` side combinations arise is no
set of outlines, and yields no boxes.
"""

from __future__ import annotations

import numpy as np

MAX_CANDIDATES = 2_000_000  # side combinations; beyond this the pixels are no set of outlines


def _runs_edges(pixels: np.ndarray, min_run: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows that start (first) or end (second) a band of horizontal runs of ``pixels``."""
    h, w = pixels.shape
    padded = np.zeros((h + 2, w + 2), bool)
    padded[1:-1, 1:-1] = pixels
    # Pixels that belong to a horizontal run of at least min_run.
    run = np.zeros_like(pixels)
    cum = np.cumsum(np.pad(pixels, ((0, 0), (1, 0))).astype(np.int32), axis=1)
    for start in range(0, w - min_run + 1):
        full = (cum[:, start + min_run] - cum[:, start]) == min_run
        run[full, start : start + min_run] = True
    above = padded[:-2, 1:-1]
    below = padded[2:, 1:-1]
    tops = np.nonzero((run & ~above).any(axis=1))[0]
    bottoms = np.nonzero((run & ~below).any(axis=1))[0]
    return tops, bottoms


def _count(table: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
    """Drawn pixels in the inclusive rectangles, from a summed-area table padded by one."""
    return table[y1 + 1, x1 + 1] - table[y0, x1 + 1] - table[y1 + 1, x0] + table[y0, x0]


def outline_boxes(
    pixels: np.ndarray, min_coverage: float = 0.95, min_side: int = 3, min_new: int = 4
) -> list[list[int]]:
    """Rectangles ``[x0, y0, x1, y1]`` (exclusive ends) drawn in bool ``pixels``; see the module."""
    if not pixels.any():
        return []
    h, w = pixels.shape
    table = np.zeros((h + 1, w + 1), np.int64)
    table[1:, 1:] = pixels.astype(np.int64).cumsum(0).cumsum(1)
    tops, bottoms = _runs_edges(pixels, min_side)
    lefts, rights = _runs_edges(pixels.T, min_side)
    if not (len(tops) and len(bottoms) and len(lefts) and len(rights)):
        return []
    if len(lefts) * len(tops) * len(rights) * len(bottoms) > MAX_CANDIDATES:
        return []  # a mess of overlay colour, not outlines: nothing is scored as drawn
    x0, y0, x1, y1 = (a.ravel() for a in np.meshgrid(lefts, tops, rights, bottoms, indexing="ij"))
    keep = (x1 - x0 + 1 >= min_side) & (y1 - y0 + 1 >= min_side)
    x0, y0, x1, y1 = x0[keep], y0[keep], x1[keep], y1[keep]

    def ring(
        k: int, a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(drawn, total) pixels of the k-th nested ring of each rectangle."""
        outer = (a + k, b + k, c - k, d - k)
        inner = (a + k + 1, b + k + 1, c - k - 1, d - k - 1)
        total = (outer[2] - outer[0] + 1) * (outer[3] - outer[1] + 1)
        drawn = _count(table, *outer)
        has_inner = (inner[2] >= inner[0]) & (inner[3] >= inner[1])
        ii = tuple(np.where(has_inner, v, 0) for v in inner)
        inner_total = np.where(has_inner, (ii[2] - ii[0] + 1) * (ii[3] - ii[1] + 1), 0)
        inner_drawn = np.where(has_inner, _count(table, *ii), 0)
        return drawn - inner_drawn, total - inner_total

    drawn, total = ring(0, x0, y0, x1, y1)
    keep = drawn >= min_coverage * total
    x0, y0, x1, y1 = x0[keep], y0[keep], x1[keep], y1[keep]
    if len(x0) == 0:
        return []
    # Stroke: how many nested rings are drawn too (at most half the short side).
    stroke = np.ones(len(x0), np.int64)
    active = np.ones(len(x0), bool)
    for k in range(1, (int(min(x1.max() - x0.min(), y1.max() - y0.min())) + 2) // 2 + 1):
        fits = active & (x1 - x0 + 1 > 2 * k) & (y1 - y0 + 1 > 2 * k)
        if not fits.any():
            break
        d, t = ring(
            k,
            np.where(fits, x0, 0),
            np.where(fits, y0, 0),
            np.where(fits, x1, 2 * k),
            np.where(fits, y1, 2 * k),
        )
        grow = fits & (d >= min_coverage * t)
        stroke[grow] += 1
        active = grow

    # Greedy cover on a copy of the pixels: a kept candidate's stroke is cleared from it.
    remaining = pixels.copy()
    chosen: list[list[int]] = []
    cands = list(zip(x0.tolist(), y0.tolist(), x1.tolist(), y1.tolist(), stroke.tolist()))
    while cands:
        gains = [_band_count(remaining, *c) for c in cands]
        best = int(np.argmax(gains))
        if gains[best] < min_new:
            break
        a, b, c, d, k = cands.pop(best)
        inner = remaining[b + k : d + 1 - k, a + k : c + 1 - k].copy()
        remaining[b : d + 1, a : c + 1] = False
        remaining[b + k : d + 1 - k, a + k : c + 1 - k] = inner
        chosen.append([a, b, c + 1, d + 1])
    return chosen


def _band_count(mask: np.ndarray, a: int, b: int, c: int, d: int, k: int) -> int:
    """Set pixels of ``mask`` in the stroke of width k inside the inclusive box (a, b)-(c, d)."""
    return int(mask[b : d + 1, a : c + 1].sum() - mask[b + k : d + 1 - k, a + k : c + 1 - k].sum())
