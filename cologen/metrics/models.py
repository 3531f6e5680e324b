"""Pretrained networks that benchmark metrics need, loaded from LOCAL paths only.

No machine of this project can download weights, so every loader takes a folder written by
``save_pretrained`` (or a TorchScript file) and fails with a one-line
``MissingModelPath`` naming the argument and what to put there when the path is not given.
Features are computed in batches under ``torch.no_grad``.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForDepthEstimation,
    AutoModelForSemanticSegmentation,
    CLIPModel,
    CLIPProcessor,
)

from cologen.metrics.images import ImageLike, to_float_batch, to_uint8_rgb

PathLike = Union[str, Path]

WHAT_TO_SUPPLY = {
    "clip_path": "a local folder holding a transformers CLIPModel and its CLIPProcessor "
    "(e.g. openai/clip-vit-large-patch14 saved with save_pretrained)",
    "dino_path": "a local folder holding a DINO ViT-S/16 for transformers AutoModel and its AutoImageProcessor "
    "(e.g. facebook/dino-vits16 saved with save_pretrained)",
    "depth_path": "a local folder holding a transformers AutoModelForDepthEstimation and its image processor "
    "(e.g. Intel/dpt-hybrid-midas saved with save_pretrained)",
    "segmenter_path": "a local folder holding a transformers AutoModelForSemanticSegmentation and its image "
    "processor trained on the benchmark's labels (e.g. openmmlab/upernet-convnext-small for ADE20K, "
    "saved with save_pretrained)",
    "fid_path": "a TorchScript Inception file (e.g. inception-2015-12-05.pt, the FID network of clean-fid and "
    "StyleGAN) or a transformers vision model folder; or pass an nn.Module",
    "hed_path": "a TorchScript file mapping a (B, 3, H, W) image in [0, 1] to a (B, 1, H, W) HED map in [0, 1]; "
    "or pass a callable",
    "lineart_path": "a TorchScript file mapping a (B, 3, H, W) image in [0, 1] to a (B, 1, H, W) line map in "
    "[0, 1]; or pass a callable",
}


class MissingModelPath(ValueError):
    """A metric needs pretrained weights and no local path was given."""


def require_path(path: PathLike | None, field: str) -> Path:
    """``path`` as a Path, or a one-line error naming ``field`` and what to put there."""
    if path is None or str(path) == "":
        raise MissingModelPath(f"{field} is not set: pass {WHAT_TO_SUPPLY[field]}")
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingModelPath(f"{field}={p} does not exist: pass {WHAT_TO_SUPPLY[field]}")
    return p


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _rgb_list(images: Sequence[ImageLike]) -> list[np.ndarray]:
    return [to_uint8_rgb(im) for im in images]


def _pixel_batches(processor: Callable, images: Sequence[ImageLike], batch_size: int, device: torch.device):
    """(RGB arrays, processed `pixel_values` on `device`) per batch of `images`: the loop every network runs."""
    arrays = _rgb_list(images)
    for i in range(0, len(arrays), batch_size):
        chunk = arrays[i : i + batch_size]
        yield chunk, processor(images=chunk, return_tensors="pt")["pixel_values"].to(device)


def _pooled(output: object) -> torch.Tensor:
    # transformers >= 5 returns a model output from get_*_features, 4.x a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output  # type: ignore[attr-defined]


class ClipEncoder:
    """A CLIP model and its processor; features are L2-normalised, float32, on the CPU."""

    def __init__(self, model: CLIPModel, processor: CLIPProcessor, device: torch.device) -> None:
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device
        self.max_tokens = int(model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def image_features(
        self, images: Sequence[ImageLike], batch_size: int = 32, normalize: bool = True
    ) -> torch.Tensor:
        feats = []
        for _, pixels in _pixel_batches(self.processor, images, batch_size, self.device):
            out = _pooled(self.model.get_image_features(pixel_values=pixels)).float()
            feats.append((F.normalize(out, dim=-1) if normalize else out).cpu())
        return torch.cat(feats) if feats else torch.empty(0)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        feats = []
        for i in range(0, len(texts), batch_size):
            tokens = self.processor(
                text=list(texts[i : i + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
            )
            out = _pooled(
                self.model.get_text_features(
                    input_ids=tokens["input_ids"].to(self.device),
                    attention_mask=tokens["attention_mask"].to(self.device),
                )
            )
            feats.append(F.normalize(out.float(), dim=-1).cpu())
        return torch.cat(feats) if feats else torch.empty(0)


class DinoEncoder:
    """A self-supervised ViT (DINO ViT-S/16, or DINOv2) through AutoModel; the feature is the
    final CLS token (``last_hidden_state[:, 0]``), L2-normalised, as DreamBench scores it.
    (Any AutoModel vision folder works; convolutional nets give their ``pooler_output``.)"""

    def __init__(self, model: torch.nn.Module, processor: Callable, device: torch.device) -> None:
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device

    @torch.no_grad()
    def image_features(
        self, images: Sequence[ImageLike], batch_size: int = 32, normalize: bool = True
    ) -> torch.Tensor:
        feats = []
        for _, pixels in _pixel_batches(self.processor, images, batch_size, self.device):
            out = self.model(pixel_values=pixels)
            last = out.last_hidden_state
            feat = (last[:, 0] if last.ndim == 3 else out.pooler_output.reshape(len(pixels), -1)).float()
            feats.append((F.normalize(feat, dim=-1) if normalize else feat).cpu())
        return torch.cat(feats) if feats else torch.empty(0)


def load_clip(path: PathLike | None, device: str | torch.device | None = None) -> ClipEncoder:
    p = require_path(path, "clip_path")
    return ClipEncoder(CLIPModel.from_pretrained(p), CLIPProcessor.from_pretrained(p), pick_device(device))


def load_dino(path: PathLike | None, device: str | torch.device | None = None) -> DinoEncoder:
    p = require_path(path, "dino_path")
    return DinoEncoder(
        AutoModel.from_pretrained(p), AutoImageProcessor.from_pretrained(p), pick_device(device)
    )


class _DenseHead(abc.ABC):
    """A transformers vision model with its processor, run over images in batches; each subclass turns one
    image's output into a map at the image's own size."""

    def __init__(self, model: torch.nn.Module, processor: Callable, device: torch.device) -> None:
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device

    @abc.abstractmethod
    def _outputs(self, pixels: torch.Tensor) -> torch.Tensor:
        """The network's per-image outputs for a processed batch."""

    @abc.abstractmethod
    def _to_map(self, output: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        """One image's output as a map of `size` (H, W)."""

    @torch.no_grad()
    def __call__(self, images: Sequence[ImageLike], batch_size: int = 8) -> list[np.ndarray]:
        maps = []
        for chunk, pixels in _pixel_batches(self.processor, images, batch_size, self.device):
            for arr, out in zip(chunk, self._outputs(pixels)):
                maps.append(self._to_map(out, arr.shape[:2]))
        return maps


class DepthEstimator(_DenseHead):
    """A monocular depth network; maps each image to a depth map at the image's own size,
    min-max scaled to ``[0, 255]`` with 255 = near (MultiGen-20M's and docs/data.md's convention;
    MiDaS/DPT predict relative inverse depth, defined only up to scale and shift)."""

    def _outputs(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).predicted_depth.float()

    def _to_map(self, output: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        d = F.interpolate(output[None, None], size=size, mode="bicubic", align_corners=False)[0, 0]
        lo, hi = d.min(), d.max()
        d = (d - lo) / (hi - lo) * 255.0 if hi > lo else torch.zeros_like(d)
        return d.cpu().numpy()


class Segmenter(_DenseHead):
    """A semantic segmentation network; maps each image to a label map (argmax of the logits
    upsampled bilinearly to the image's size)."""

    @property
    def num_classes(self) -> int:
        return int(self.model.config.num_labels)

    def _outputs(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).logits.float()

    def _to_map(self, output: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        up = F.interpolate(output[None], size=size, mode="bilinear", align_corners=False)[0]
        return up.argmax(0).cpu().numpy().astype(np.int32)


def load_depth_model(path: PathLike | None, device: str | torch.device | None = None) -> DepthEstimator:
    p = require_path(path, "depth_path")
    return DepthEstimator(
        AutoModelForDepthEstimation.from_pretrained(p),
        AutoImageProcessor.from_pretrained(p),
        pick_device(device),
    )


def load_segmenter(path: PathLike | None, device: str | torch.device | None = None) -> Segmenter:
    p = require_path(path, "segmenter_path")
    return Segmenter(
        AutoModelForSemanticSegmentation.from_pretrained(p),
        AutoImageProcessor.from_pretrained(p),
        pick_device(device),
    )


def load_module_file(path: Path, device: torch.device) -> torch.nn.Module:
    """A network saved as one TorchScript file (``torch.jit.save``): code and weights together,
    so no model class has to be importable here. The standard FID Inception ships in this form,
    so TorchScript's deprecation warning is silenced here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location=device).eval()


class MapDetector:
    """An image-to-map network for HED or lineart conditions: ``(B, 3, H, W)`` in ``[0, 1]`` to
    ``(B, 1, H, W)`` in ``[0, 1]``; returns ``uint8`` ``H x W`` maps (0-255) per image."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> None:
        self.fn = fn
        self.device = device

    @torch.no_grad()
    def __call__(self, images: Sequence[ImageLike]) -> list[np.ndarray]:
        maps = []
        for im in images:
            out = self.fn(to_float_batch([im]).to(self.device)).float()
            maps.append((out.reshape(out.shape[-2:]).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())
        return maps


def load_map_detector(
    detector: PathLike | Callable[[torch.Tensor], torch.Tensor] | None,
    field: str,
    device: str | torch.device | None = None,
) -> MapDetector:
    """``detector``: a callable, or the path of a TorchScript file; ``field`` names
    the argument in errors (``hed_path`` or ``lineart_path``)."""
    dev = pick_device(device)
    if callable(detector):
        return MapDetector(detector, dev)
    return MapDetector(load_module_file(require_path(detector, field), dev), dev)
