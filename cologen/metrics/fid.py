"""FID through torchmetrics' ``FrechetInceptionDistance`` with a feature network we supply.

torchmetrics' built-in Inception needs torch-fidelity and downloads weights; instead its
``feature=`` argument takes any ``nn.Module`` that maps a ``uint8`` batch ``(B, 3, H, W)`` to
features ``(B, D)`` (it reads ``num_features`` if the module has it). This module wraps:

- a TorchScript Inception file, e.g. ``inception-2015-12-05.pt`` (the FID network of clean-fid
  and StyleGAN): images go in as float 0-255 resized to 299 x 299, and ``return_features=True``
  is passed when its forward takes it, which gives the 2048-d pool features of standard FID;
- a transformers vision model folder (CLIP, DINO, DINOv2...): the pooled / CLS embedding, as in
  FD-DINOv2;
- or any ``nn.Module`` passed in as is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from cologen.metrics.images import ImageLike, to_uint8_rgb
from cologen.metrics.models import (
    ClipEncoder,
    DinoEncoder,
    PathLike,
    load_clip,
    load_module_file,
    pick_device,
    require_path,
)

FeatureLike = Union[nn.Module, PathLike, None]


class FileFeatures(nn.Module):
    """A feature network loaded from one file; takes ``uint8`` ``(B, 3, H, W)``."""

    def __init__(self, net: nn.Module, input_size: int | None = 299, call_kwargs: dict | None = None) -> None:
        super().__init__()
        self.net = net
        self.input_size = input_size
        self.call_kwargs = call_kwargs or {}

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False
            )
        return self.net(x, **self.call_kwargs).reshape(x.shape[0], -1)


class EncoderFeatures(nn.Module):
    """A transformers vision encoder (``ClipEncoder`` / ``DinoEncoder``) as a feature network;
    takes ``uint8`` ``(B, 3, H, W)``. Features are not L2-normalised: FID compares raw
    embedding statistics."""

    def __init__(self, encoder: ClipEncoder | DinoEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.model = encoder.model  # registered, so the metric's .to(device) moves it
        probe = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
        self.num_features = int(self.forward(probe).shape[-1])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.encoder.device = next(self.model.parameters()).device
        arrays = [im.permute(1, 2, 0).cpu().numpy().astype(np.uint8) for im in images]
        return self.encoder.image_features(arrays, batch_size=len(arrays), normalize=False)


def load_fid_features(
    path: PathLike | None, device: str | torch.device | None = None, input_size: int | None = 299
) -> nn.Module:
    """A feature network for FID from a local path (see the module docstring for the kinds)."""
    p = require_path(path, "fid_path")
    dev = pick_device(device)
    if p.is_dir():
        if AutoConfig.from_pretrained(p).model_type == "clip":
            return EncoderFeatures(load_clip(p, dev))
        return EncoderFeatures(
            DinoEncoder(AutoModel.from_pretrained(p), AutoImageProcessor.from_pretrained(p), dev)
        )
    net = load_module_file(Path(p), dev)
    kwargs = {}
    schema = getattr(getattr(net, "forward", None), "schema", None)
    if schema is not None and any(a.name == "return_features" for a in schema.arguments):
        kwargs["return_features"] = True
    return FileFeatures(net, input_size=input_size, call_kwargs=kwargs)


def make_fid(feature: FeatureLike, device: str | torch.device | None = None) -> FrechetInceptionDistance:
    """A torchmetrics FID metric on ``uint8`` images with the given feature network or path."""
    if not isinstance(feature, nn.Module):
        feature = load_fid_features(feature, device)
    dev = pick_device(device)
    return FrechetInceptionDistance(feature=feature, normalize=False).to(dev)


def _uint8_batches(images: Iterable[ImageLike], batch_size: int) -> Iterable[torch.Tensor]:
    """Consecutive same-size images stacked into ``uint8`` ``(B, 3, H, W)`` batches."""
    chunk: list[np.ndarray] = []
    for im in images:
        arr = to_uint8_rgb(im)
        if chunk and (arr.shape != chunk[0].shape or len(chunk) == batch_size):
            yield torch.from_numpy(np.stack(chunk)).permute(0, 3, 1, 2).contiguous()
            chunk = []
        chunk.append(arr)
    if chunk:
        yield torch.from_numpy(np.stack(chunk)).permute(0, 3, 1, 2).contiguous()


def fid_update(
    fid: FrechetInceptionDistance, images: Iterable[ImageLike], real: bool, batch_size: int = 32
) -> None:
    device = fid.real_features_sum.device
    for batch in _uint8_batches(images, batch_size):
        fid.update(batch.to(device), real=real)


def frechet_distance(
    real: Sequence[ImageLike],
    fake: Sequence[ImageLike],
    feature: FeatureLike,
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> float:
    """FID between two image sets (at least two images each) with the given feature network."""
    fid = make_fid(feature, device)
    fid_update(fid, real, real=True, batch_size=batch_size)
    fid_update(fid, fake, real=False, batch_size=batch_size)
    return float(fid.compute())
