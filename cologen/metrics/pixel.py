"""Pixel metrics on uint8 RGB images: PSNR, SSIM (whole image or inside a region), MS-SSIM, L1, RMSE.

SSIM and PSNR come from torchmetrics' functional API; the region versions average torchmetrics'
full SSIM map over the region's pixels. All inputs go through ``to_uint8_rgb`` (see images.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    structural_similarity_index_measure,
)

from cologen.metrics.images import ImageLike, to_float_batch, to_uint8_rgb

# Identical images have infinite PSNR; a cap keeps means finite. 100 dB is above any non-identical
# pair of 8-bit images up to 1024 x 1024 (one channel of one pixel off by one gives ~110 dB there,
# so the cap is reached only by, or next to, an exact copy).
PSNR_CAP_DB = 100.0


def _pair(a: ImageLike, b: ImageLike) -> tuple[np.ndarray, np.ndarray]:
    x, y = to_uint8_rgb(a), to_uint8_rgb(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {x.shape} vs {y.shape}")
    return x, y


def psnr_from_mse(mse: float, data_range: float = 255.0) -> float:
    """``10 log10(range^2 / mse)``, capped at ``PSNR_CAP_DB``."""
    if mse <= 0:
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, 10.0 * math.log10(data_range**2 / mse))


def psnr(output: ImageLike, target: ImageLike, region: np.ndarray | None = None) -> float:
    """PSNR in dB over all channels of the pixels in ``region`` (bool H x W; whole image if None).

    An empty region gives NaN (nothing to measure), which ``aggregate`` skips.
    """
    x, y = _pair(output, target)
    diff = x.astype(np.float64) - y.astype(np.float64)
    if region is not None:
        if not region.any():
            return float("nan")
        diff = diff[region]
    return psnr_from_mse(float(np.mean(diff**2)))


def ssim_map(output: ImageLike, target: ImageLike) -> np.ndarray:
    """Per-pixel SSIM (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03) on
    ``[0, 1]`` RGB, averaged over channels: an ``H x W`` float array. Borders are reflect-padded,
    as torchmetrics does, so every pixel has a value."""
    x, y = _pair(output, target)
    _, full = structural_similarity_index_measure(
        to_float_batch([x]).double(),
        to_float_batch([y]).double(),
        data_range=1.0,
        return_full_image=True,
    )
    return full[0].mean(0).numpy()


def ssim(output: ImageLike, target: ImageLike, region: np.ndarray | None = None) -> float:
    """Mean SSIM over the pixels of ``region`` (whole image if None; NaN if the region is empty)."""
    full = ssim_map(output, target)
    if region is None:
        return float(full.mean())
    return float(full[region].mean()) if region.any() else float("nan")


def ms_ssim(
    output: ImageLike, target: ImageLike, betas: Sequence[float] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
) -> float:
    """Multi-scale SSIM (Wang et al. 2003) via torchmetrics. With the default five scales the
    image's short side must exceed 160 px; pass fewer ``betas`` for smaller images."""
    x, y = _pair(output, target)
    value = multiscale_structural_similarity_index_measure(
        to_float_batch([x]), to_float_batch([y]), data_range=1.0, betas=tuple(betas)
    )
    return float(value)


def l1(output: ImageLike, target: ImageLike, region: np.ndarray | None = None) -> float:
    """Mean absolute difference in ``[0, 1]`` units (0 = identical), over ``region`` if given."""
    x, y = _pair(output, target)
    diff = np.abs(x.astype(np.float64) - y.astype(np.float64)) / 255.0
    if region is not None:
        if not region.any():
            return float("nan")
        diff = diff[region]
    return float(diff.mean())


def rmse(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> float:
    """Root mean squared error between two arrays of the same shape, in their own units
    (depth maps: 0-255, as MultiGen-20M stores them)."""
    p = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    t = target.detach().cpu().numpy() if isinstance(target, torch.Tensor) else np.asarray(target)
    if p.shape != t.shape:
        raise ValueError(f"shapes differ: {p.shape} vs {t.shape}")
    return float(np.sqrt(np.mean((p.astype(np.float64) - t.astype(np.float64)) ** 2)))
