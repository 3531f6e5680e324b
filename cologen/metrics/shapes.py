"""Which shape a blob of pixels is, by its best match against prototype shapes.

The prototypes are ShapeWorld's upright shapes, given as polygon vertices in the unit circle
(y down): a blob is cropped to its bounding box and resized to 32 x 32 (area averaging), each
prototype is drawn filling a 32 x 32 box the same way, and the blob takes the name of the
prototype with the highest soft IoU (sum of pixelwise minima over sum of maxima). Stretching
both to their boxes makes the match independent of size and position, not of rotation (ShapeWorld
draws shapes upright, and a diamond is a rotated square). Reliable from about 12 px across.
"""

from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np

_GRID = 32


def _ring(n: int, radius: np.ndarray | float = 1.0, phase: float = 0.0) -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False) + phase
    return np.stack([radius * np.cos(a), radius * np.sin(a)], 1)


_W, _E = 0.36, 0.95  # the cross's arm half-width and reach
SHAPE_PROTOTYPES: dict[str, np.ndarray] = {
    "circle": _ring(24),
    "square": np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]]),
    "triangle": np.array([[0.0, -1.0], [0.95, 0.8], [-0.95, 0.8]]),
    "diamond": np.array([[0.0, -1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]),
    "cross": np.array(
        [
            [-_W, -_E],
            [_W, -_E],
            [_W, -_W],
            [_E, -_W],
            [_E, _W],
            [_W, _W],
            [_W, _E],
            [-_W, _E],
            [-_W, _W],
            [-_E, _W],
            [-_E, -_W],
            [-_W, -_W],
        ]
    ),  # fmt: skip
    "star": _ring(10, np.where(np.arange(10) % 2 == 0, 1.0, 0.45), -np.pi / 2),
    "hexagon": _ring(6),
}


def _to_grid(mask: np.ndarray) -> np.ndarray:
    """A bool mask cropped to its bounding box, area-resized to the grid, values in [0, 1]."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float32)
    return cv2.resize(crop, (_GRID, _GRID), interpolation=cv2.INTER_AREA)


def prototype_grid(polygon: np.ndarray, resolution: int = 256) -> np.ndarray:
    """A polygon drawn filling its bounding box, at the grid size (drawn large, then area-resized)."""
    lo, hi = polygon.min(0), polygon.max(0)
    pts = (polygon - lo) / (hi - lo) * resolution
    canvas = np.zeros((resolution, resolution), np.uint8)
    cv2.fillPoly(canvas, [np.round(pts * 16).astype(np.int32)], 255, lineType=cv2.LINE_AA, shift=4)
    return cv2.resize(canvas.astype(np.float32) / 255.0, (_GRID, _GRID), interpolation=cv2.INTER_AREA)


_PROTOTYPE_GRIDS = {name: prototype_grid(poly) for name, poly in SHAPE_PROTOTYPES.items()}


def shape_scores(
    component: np.ndarray, prototypes: Mapping[str, np.ndarray] | None = None
) -> dict[str, float]:
    """Soft IoU of one bool blob with every prototype (polygons; the built-in ones if None)."""
    grids = _PROTOTYPE_GRIDS if prototypes is None else {k: prototype_grid(v) for k, v in prototypes.items()}
    blob = _to_grid(component)
    return {
        name: float(np.minimum(blob, g).sum() / max(np.maximum(blob, g).sum(), 1e-6))
        for name, g in grids.items()
    }


def classify_shape(component: np.ndarray, prototypes: Mapping[str, np.ndarray] | None = None) -> str:
    """The name of the prototype that best matches a bool blob."""
    scores = shape_scores(component, prototypes)
    return max(scores, key=scores.__getitem__)


def known_shapes(prototypes: Mapping[str, np.ndarray] | None = None) -> tuple[str, ...]:
    return tuple(SHAPE_PROTOTYPES if prototypes is None else prototypes)
