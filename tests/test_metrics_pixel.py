"""Pixel metrics against independent reference implementations written here in numpy:
SSIM by Wang et al. (2004), L1, PSNR, RMSE; edge F1 on hand-made maps; mIoU by definition."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from PIL import Image

from cologen.metrics.edges import canny_edges, edge_f1, edge_precision_recall_f1
from cologen.metrics.images import to_mask, to_uint8_rgb
from cologen.metrics.pixel import PSNR_CAP_DB, l1, ms_ssim, psnr, rmse, ssim, ssim_map
from cologen.metrics.segmentation import ConfusionMatrix, mean_iou


def reference_ssim_map(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Wang et al. SSIM, written from the paper: 11 x 11 Gaussian window (sigma 1.5), K1 = 0.01,
    K2 = 0.03, data range 1, per channel, borders reflect-padded; averaged over channels."""
    x = x.astype(np.float64) / 255.0
    y = y.astype(np.float64) / 255.0
    r = 5
    g = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    maps = []
    for c in range(x.shape[2]):
        px = np.pad(x[:, :, c], r, mode="reflect")
        py = np.pad(y[:, :, c], r, mode="reflect")
        wx = np.lib.stride_tricks.sliding_window_view(px, (11, 11))
        wy = np.lib.stride_tricks.sliding_window_view(py, (11, 11))
        mx = np.einsum("ijkl,kl->ij", wx, window)
        my = np.einsum("ijkl,kl->ij", wy, window)
        vx = np.einsum("ijkl,kl->ij", wx * wx, window) - mx**2
        vy = np.einsum("ijkl,kl->ij", wy * wy, window) - my**2
        cxy = np.einsum("ijkl,kl->ij", wx * wy, window) - mx * my
        maps.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return np.mean(maps, axis=0)


def smooth_pair(seed: int, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.integers(0, 256, (size, size, 3)).astype(np.uint8), (7, 7), 2)
    noisy = np.clip(base.astype(int) + rng.integers(-30, 31, base.shape), 0, 255).astype(np.uint8)
    return base, noisy


@pytest.mark.parametrize("seed", [0, 1])
def test_ssim_matches_the_wang_formula(seed: int) -> None:
    a, b = smooth_pair(seed)
    ref = reference_ssim_map(a, b)
    np.testing.assert_allclose(ssim_map(a, b), ref, atol=1e-6)
    assert ssim(a, b) == pytest.approx(ref.mean(), abs=1e-6)
    region = np.zeros(a.shape[:2], bool)
    region[10:30, 5:40] = True
    assert ssim(a, b, region) == pytest.approx(ref[region].mean(), abs=1e-6)
    assert ssim(a, a) == pytest.approx(1.0)


def test_l1_psnr_rmse_match_numpy() -> None:
    a, b = smooth_pair(3)
    d = a.astype(np.float64) - b.astype(np.float64)
    assert l1(a, b) == pytest.approx(np.abs(d).mean() / 255.0)
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / np.mean(d**2)))
    region = np.zeros(a.shape[:2], bool)
    region[:20] = True
    assert l1(a, b, region) == pytest.approx(np.abs(d[:20]).mean() / 255.0)
    assert psnr(a, b, region) == pytest.approx(10 * math.log10(255**2 / np.mean(d[:20] ** 2)))
    assert psnr(a, a) == PSNR_CAP_DB
    assert math.isnan(psnr(a, b, np.zeros(a.shape[:2], bool)))
    depth_a, depth_b = a[..., 0].astype(float), b[..., 0].astype(float)
    assert rmse(depth_a, depth_b) == pytest.approx(np.sqrt(np.mean((depth_a - depth_b) ** 2)))


def test_ms_ssim_orders_images() -> None:
    a, b = smooth_pair(4, size=176)  # five scales need more than 160 px
    assert 0 < ms_ssim(a, b) < 1
    small_a, small_b = smooth_pair(4, size=48)
    assert ms_ssim(small_a, small_a, betas=(0.5, 0.5)) == pytest.approx(1.0, abs=1e-5)
    assert 0 < ms_ssim(small_a, small_b, betas=(0.5, 0.5)) < 1


def test_image_conventions() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (8, 9, 3)).astype(np.uint8)
    np.testing.assert_array_equal(to_uint8_rgb(Image.fromarray(rgb)), rgb)
    import torch

    t = torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1
    np.testing.assert_array_equal(to_uint8_rgb(t), rgb)
    np.testing.assert_array_equal(to_uint8_rgb(t[None]), rgb)
    with pytest.raises(ValueError, match="uint8"):
        to_uint8_rgb(rgb.astype(np.float32))
    m = to_mask([2, 1, 5, 3], (8, 9))
    assert m.sum() == 6 and m[1, 2] and not m[3, 2]


def test_edge_f1_by_hand() -> None:
    ref = np.zeros((20, 20), bool)
    ref[5, 2:18] = True  # one horizontal line, 16 px
    assert edge_f1(ref, ref, tolerance=0) == 1.0
    moved = np.roll(ref, 1, axis=0)
    assert edge_f1(moved, ref, tolerance=0) == 0.0
    assert edge_f1(moved, ref, tolerance=1.5) == 1.0
    half = ref.copy()
    half[5, 10:18] = False  # half the line found: precision 1, recall 1/2, F1 2/3
    assert edge_precision_recall_f1(half, ref, tolerance=0) == pytest.approx((1.0, 0.5, 2 / 3))
    assert edge_f1(np.zeros_like(ref), ref) == 0.0
    assert edge_f1(np.zeros_like(ref), np.zeros_like(ref)) == 1.0


def test_canny_uses_fixed_thresholds() -> None:
    img = np.zeros((32, 32, 3), np.uint8)
    img[8:24, 8:24] = 255
    edges = canny_edges(img)
    np.testing.assert_array_equal(edges, cv2.Canny(img, 100, 200) > 0)
    faint = np.full((32, 32, 3), 100, np.uint8)
    faint[8:24, 8:24] = 120  # a step below the thresholds
    assert not canny_edges(faint).any()


def test_miou_by_definition() -> None:
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, (16, 16))
    pred = gt.copy()
    pred[:4] = rng.integers(0, 4, (4, 16))
    ious = []
    for c in range(4):
        inter = np.sum((pred == c) & (gt == c))
        union = np.sum((pred == c) | (gt == c))
        ious.append(inter / union)
    assert mean_iou(pred, gt, 4) == pytest.approx(np.mean(ious))
    assert mean_iou(gt, gt, 4) == 1.0

    ignored = gt.copy()
    ignored[0] = 255
    assert mean_iou(gt, ignored, 4) == 1.0  # ignored pixels count for nothing
    out_of_range = gt.copy()
    out_of_range[0] = 9
    assert mean_iou(out_of_range, gt, 4) < 1.0  # an unknown predicted id is a miss

    cm = ConfusionMatrix(4)
    cm.update(gt, gt)
    cm.update(pred, gt)
    both_pred, both_gt = np.concatenate([gt, pred]), np.concatenate([gt, gt])
    assert cm.miou() == pytest.approx(mean_iou(both_pred, both_gt, 4))
