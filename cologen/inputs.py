"""What generation accepts, checked in one place for `cologen predict` and `CoLoGenPipeline`: the task names and the
condition images (a path, a PIL image, a uint8 array or a tensor in [-1, 1]).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from cologen.data.tasks import CURRICULUM_TASKS, MULTI_CONDITION_TASKS
from cologen.errors import MissingInput, UsageError

# The five curriculum tasks and plain text-to-image (no condition image): one condition image at most ...
SINGLE_CONDITION_TASKS: tuple[str, ...] = (*CURRICULUM_TASKS, "t2i")
# ... and the tasks with several (docs/multi_condition.md)
GENERATION_TASKS: tuple[str, ...] = (*SINGLE_CONDITION_TASKS, *MULTI_CONDITION_TASKS)
ImageInput = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]


def check_task(task: object, what: str = "task") -> str:
    """`task` if it is a generation task, else a one-line UsageError with the closest name and the known ones."""
    if isinstance(task, str) and task in GENERATION_TASKS:
        return task
    close = difflib.get_close_matches(str(task), GENERATION_TASKS, n=1) if isinstance(task, str) else []
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UsageError(f"{what}: unknown task {task!r} ({hint}known tasks: {', '.join(GENERATION_TASKS)})")


def read_rgb(path: str | Path, what: str = "image") -> np.ndarray:
    """(H, W, 3) uint8 of an image file; one-line errors for a missing or unreadable file."""
    p = Path(path)
    if not p.is_file():
        raise MissingInput(f"{what}: file not found: {p}")
    try:
        with Image.open(p) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as err:  # noqa: BLE001 - PIL raises several kinds for a file that is not an image
        raise UsageError(f"{what}: cannot read {p} as an image ({type(err).__name__})") from None


def image_size(image: ImageInput) -> tuple[int, int]:
    """(width, height) of a condition image given in any accepted form."""
    if isinstance(image, (str, Path)):
        rgb = read_rgb(image)
        return rgb.shape[1], rgb.shape[0]
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, (np.ndarray, torch.Tensor)):
        shape = tuple(image.shape)
        return (shape[-1], shape[-2]) if isinstance(image, torch.Tensor) else (shape[1], shape[0])
    raise UsageError(f"image: expected a path, a PIL image, a uint8 array or a tensor, got {type(image).__name__}")


def to_rgb(image: ImageInput, what: str = "image") -> np.ndarray:
    """(H, W, 3) uint8 of any accepted form (tensors: (3, H, W) in [-1, 1])."""
    if isinstance(image, (str, Path)):
        return read_rgb(image, what)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise UsageError(f"{what}: a tensor must be (3, H, W) in [-1, 1], got shape {tuple(image.shape)}")
        return ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise UsageError(f"{what}: an array must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        return image
    raise UsageError(f"{what}: expected a path, a PIL image, a uint8 array or a tensor, got {type(image).__name__}")


def fit(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale to cover (width, height) keeping the aspect ratio and crop the centre (as training data is)."""
    from cologen.data.geometry import fit_frame, warp

    if rgb.shape[:2] == (height, width):
        return rgb
    return warp(rgb, fit_frame(rgb.shape[1], rgb.shape[0], width, height))


MASK_GREY = 128  # the builders' default: the masked area of an inpainting source


def masked_source(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """An inpainting source as training builds one: `rgb` with the pixels where `mask` is true greyed."""
    out = rgb.copy()
    out[mask] = MASK_GREY
    return out


def mask_array(image: ImageInput | np.ndarray, width: int, height: int, what: str = "mask") -> np.ndarray:
    """(height, width) bool of an inpainting mask given as an image (white: the region to fill), fitted to the size
    as its source is; a 2-D bool array of that size is kept as it is."""
    if isinstance(image, np.ndarray) and image.ndim == 2:
        if image.shape != (height, width):
            raise UsageError(f"{what}: a 2-D mask must be {height}x{width}, got {image.shape[0]}x{image.shape[1]}")
        return image.astype(bool)
    return fit(to_rgb(image, what), width, height).mean(-1) > 127


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(3, H, W) float in [-1, 1] of an (H, W, 3) uint8 image."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 127.5 - 1


def condition_tensor(image: ImageInput, width: int, height: int, what: str = "image") -> torch.Tensor:
    """A condition image of any accepted form as (3, height, width) in [-1, 1]; a tensor of that size is kept
    exactly."""
    if isinstance(image, torch.Tensor) and tuple(image.shape) == (3, height, width):
        return image.detach().float()
    return to_tensor(fit(to_rgb(image, what), width, height))
