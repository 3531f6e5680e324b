"""Edge maps and the edge F1 score, shared by the ShapeWorld control metric and MultiGen-20M.

Edges: OpenCV Canny on the RGB image (OpenCV takes, per pixel, the channel with the strongest
gradient; ControlNet's canny annotator calls it the same way, and so do the task builders) with
fixed thresholds 100 / 200 (the thresholds ControlNet++ uses for MultiGen-20M canny). F1: a boundary F-measure with a pixel tolerance:
a predicted edge pixel is correct when a reference edge pixel lies within ``tolerance`` pixels
(Euclidean), and a reference pixel is recalled when a predicted one lies within it.
``tolerance=0`` is plain pixel-exact F1.
"""

from __future__ import annotations

import cv2
import numpy as np

from cologen.metrics.images import ImageLike, to_gray, to_uint8_rgb

CANNY_LOW = 100
CANNY_HIGH = 200
EDGE_TOLERANCE_PX = 1.5  # one pixel, diagonal neighbours included


def canny_edges(image: ImageLike, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> np.ndarray:
    """Boolean ``H x W`` Canny edge map of an RGB image."""
    return cv2.Canny(to_uint8_rgb(image), low, high) > 0


def as_edge_map(edges: np.ndarray | ImageLike) -> np.ndarray:
    """A stored edge map (bool, or uint8 / image with white edges on black) as bool ``H x W``."""
    if isinstance(edges, np.ndarray) and edges.ndim == 2:
        return edges.astype(bool) if edges.dtype == bool else edges > 127
    return to_gray(edges) > 127


def _distance_to(edges: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel to the nearest edge pixel (inf when there is none)."""
    if not edges.any():
        return np.full(edges.shape, np.inf, dtype=np.float32)
    # distanceTransform measures the distance to the nearest zero pixel.
    return cv2.distanceTransform((~edges).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def edge_precision_recall_f1(
    pred: np.ndarray, ref: np.ndarray, tolerance: float = EDGE_TOLERANCE_PX
) -> tuple[float, float, float]:
    """(precision, recall, F1) of bool edge map ``pred`` against ``ref``.

    Both empty: (1, 1, 1), nothing was to be found and nothing was found. One empty: the other
    side's ratio is 0 and F1 is 0.
    """
    if pred.shape != ref.shape:
        raise ValueError(f"edge maps differ in size: {pred.shape} vs {ref.shape}")
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    if n_pred == 0 and n_ref == 0:
        return 1.0, 1.0, 1.0
    if n_pred == 0 or n_ref == 0:
        return (0.0 if n_pred else 1.0), (0.0 if n_ref else 1.0), 0.0
    precision = float((_distance_to(ref)[pred] <= tolerance).mean())
    recall = float((_distance_to(pred)[ref] <= tolerance).mean())
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return precision, recall, f1


def edge_f1(pred: np.ndarray, ref: np.ndarray, tolerance: float = EDGE_TOLERANCE_PX) -> float:
    """F1 of two bool edge maps with a pixel tolerance (see module docstring)."""
    return edge_precision_recall_f1(pred, ref, tolerance)[2]
