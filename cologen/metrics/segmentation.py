"""Mean IoU of label maps, accumulated over a dataset the way segmentation benchmarks report it
(one confusion matrix summed over all images, IoU per class, mean over classes that occur)."""

from __future__ import annotations

import numpy as np
import torch


class ConfusionMatrix:
    """Accumulates a ``num_classes x num_classes`` confusion matrix (rows: ground truth)."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        # Pixels predicted as an id outside the classes: false negatives of their gt class only.
        self.out_of_range = np.zeros(num_classes, dtype=np.int64)

    def update(self, pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> float:
        """Add one image (integer label maps of one shape); returns that image's own mIoU."""
        p = np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred).astype(np.int64).ravel()
        g = np.asarray(gt.cpu() if isinstance(gt, torch.Tensor) else gt).astype(np.int64).ravel()
        if p.shape != g.shape:
            raise ValueError(f"label maps differ in size: {p.shape} vs {g.shape}")
        keep = (g >= 0) & (g < self.num_classes)
        if self.ignore_index is not None:
            keep &= g != self.ignore_index
        n = self.num_classes
        p = np.where((p >= 0) & (p < n), p, n)  # the spare column n collects out-of-range ids
        counts = np.bincount(g[keep] * (n + 1) + p[keep], minlength=n * (n + 1)).reshape(n, n + 1)
        self.matrix += counts[:, :n]
        self.out_of_range += counts[:, n]
        ious = iou_from_matrix(counts[:, :n], counts[:, n])
        return float(np.nanmean(ious)) if np.isfinite(ious).any() else float("nan")

    def iou_per_class(self) -> np.ndarray:
        """IoU of each class, NaN for classes absent from both ground truth and prediction."""
        return iou_from_matrix(self.matrix, self.out_of_range)

    def miou(self) -> float:
        ious = self.iou_per_class()
        return float(np.nanmean(ious)) if np.isfinite(ious).any() else float("nan")


def iou_from_matrix(matrix: np.ndarray, extra_fn: np.ndarray | None = None) -> np.ndarray:
    tp = np.diag(matrix).astype(np.float64)
    fn = matrix.sum(1) - np.diag(matrix) + (0 if extra_fn is None else extra_fn)
    fp = matrix.sum(0) - np.diag(matrix)
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(
    pred: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    num_classes: int,
    ignore_index: int | None = 255,
) -> float:
    """mIoU of one pair of label maps: mean IoU over classes present in either map."""
    return ConfusionMatrix(num_classes, ignore_index).update(pred, gt)
