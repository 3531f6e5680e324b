"""Image conventions for every metric: one canonical form, converted at the edge.

Metrics compute on ``uint8`` numpy arrays ``H x W x 3`` in RGB order (exact colours for the
ShapeWorld checks, and what OpenCV wants). Anything else is converted here, once:

- ``PIL.Image.Image`` of any mode (converted to RGB);
- numpy ``uint8`` ``H x W x 3`` (as is) or ``H x W`` (grey, repeated to three channels);
- torch tensors ``(3, H, W)`` or ``(1, 3, H, W)``: float in ``[-1, 1]`` (the model's convention),
  or ``uint8`` in ``[0, 255]``.

Float numpy arrays are refused: ``[0, 1]`` and ``[-1, 1]`` cannot be told apart reliably.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import cv2
import numpy as np
import torch
from PIL import Image

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]
MaskLike = Union[Image.Image, np.ndarray, torch.Tensor, Sequence[int]]


def to_uint8_rgb(image: ImageLike) -> np.ndarray:
    """Return ``image`` as a contiguous ``uint8`` ``H x W x 3`` RGB array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"expected a tensor (3, H, W) or (1, 3, H, W), got shape {tuple(image.shape)}")
        if t.dtype == torch.uint8:
            arr = t.numpy()
        else:
            # [-1, 1] -> [0, 255], rounded like a PNG export of the same tensor would be.
            arr = ((t.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        arr = np.transpose(arr, (1, 2, 0))
        return np.ascontiguousarray(np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(
                f"numpy images must be uint8 H x W x 3 (got dtype {image.dtype}); "
                "pass float images as torch tensors in [-1, 1]"
            )
        if image.ndim == 2:
            return np.ascontiguousarray(np.repeat(image[:, :, None], 3, axis=2))
        if image.ndim == 3 and image.shape[2] == 3:
            return np.ascontiguousarray(image)
        if image.ndim == 3 and image.shape[2] == 4:
            return np.ascontiguousarray(image[:, :, :3])
        raise ValueError(f"expected a numpy image H x W x 3, got shape {image.shape}")
    raise TypeError(f"unsupported image type {type(image).__name__}")


def to_gray(image: ImageLike) -> np.ndarray:
    """``uint8`` ``H x W`` luma (ITU-R 601, as OpenCV's RGB2GRAY)."""
    return cv2.cvtColor(to_uint8_rgb(image), cv2.COLOR_RGB2GRAY)


def to_pil(image: ImageLike) -> Image.Image:
    return Image.fromarray(to_uint8_rgb(image))


def to_float_batch(images: Sequence[ImageLike]) -> torch.Tensor:
    """Stack images into a float tensor ``(B, 3, H, W)`` in ``[0, 1]`` (all the same size)."""
    arrays = [to_uint8_rgb(im) for im in images]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"images must share one size to be batched, got {sorted(shapes)}")
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch.float() / 255.0


def to_mask(mask: MaskLike, shape: tuple[int, int]) -> np.ndarray:
    """Boolean ``H x W`` region mask.

    Accepts a box ``[x0, y0, x1, y1]`` (exclusive ends, docs/data.md), a bool array, an integer
    array or PIL image where values above 127 are inside (the shard convention: 255 = region; an
    array holding only 0 and 1 counts its 1s), or a tensor (bool, or float above 0.5 is inside).
    """
    h, w = shape
    if isinstance(mask, (list, tuple)) and len(mask) == 4 and all(np.isscalar(v) for v in mask):
        x0, y0, x1, y1 = (int(round(float(v))) for v in mask)
        out = np.zeros((h, w), dtype=bool)
        out[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
        return out
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    if isinstance(mask, torch.Tensor):
        t = mask.detach().cpu().squeeze()
        arr = t.numpy() if t.dtype == torch.bool else (t.float() > 0.5).numpy()
    else:
        arr = np.asarray(mask)
        if arr.ndim == 3:
            arr = arr[..., 0]
        if arr.dtype != bool:
            # 0/1 masks (as the task builders give) and 0/255 masks (as shards store) both work.
            arr = arr > 0 if arr.max(initial=0) <= 1 else arr > 127
    if arr.shape != (h, w):
        raise ValueError(f"mask shape {arr.shape} does not match image shape {(h, w)}")
    return arr.astype(bool)


def resize(image: ImageLike, size: tuple[int, int], resample: int = Image.BICUBIC) -> np.ndarray:
    """Resize to ``(width, height)``; bicubic for images, pass ``Image.NEAREST`` for label maps."""
    if isinstance(image, np.ndarray) and image.ndim == 2:
        # Label maps: PIL resizes int32 ("I" mode) without touching the ids.
        arr = image if image.dtype == np.uint8 else image.astype(np.int32)
        return np.asarray(Image.fromarray(arr).resize(size, resample))
    return np.asarray(to_pil(image).resize(size, resample))
