"""Latent codecs: images in [-1, 1] <-> normalized latents. The LightningModule only sees this interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class LatentCodec(nn.Module, ABC):
    """Maps images (B, 3, H, W) in [-1, 1] to normalized latents (B, C, H/f, W/f) and back.

    `downsample` is the pixel size of one latent cell; a packed token covers 2 x 2 cells, so image sides must be
    divisible by `2 * downsample` (`patch_pixels`).
    """

    latent_channels: int
    downsample: int

    @property
    def patch_pixels(self) -> int:
        return 2 * self.downsample

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def encode_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A pixel mask (B, 1, H, W) (1: repaint) as a latent mask (B, C, H/f, W/f) of 0s and 1s: a latent cell is
        repainted when any of its pixels is, so no pixel of the region is kept from the source (diffusers'
        inpainting pipelines resize the mask by nearest neighbour, which can keep a cell the region covers)."""
        cells = F.max_pool2d((mask > 0.5).float(), self.downsample)
        return cells.expand(-1, self.latent_channels, -1, -1)


class PixelCodec(LatentCodec):
    """Exact, weight-free codec of the tiny preset: pixel-unshuffle by `factor` (and pixel-shuffle back).

    With factor 2 and FLUX's 2x2 packing a 32 x 32 image becomes 8 x 8 = 64 tokens of 48 channels.
    """

    def __init__(self, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.downsample = factor
        self.latent_channels = 3 * factor * factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images, self.factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents, self.factor)

    def encode_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Exact per pixel: each latent channel is one pixel of one colour, so it takes that pixel's mask."""
        return F.pixel_unshuffle((mask > 0.5).float().expand(-1, 3, -1, -1), self.factor)


class VAECodec(LatentCodec):
    """FLUX's AutoencoderKL with `(latent - shift) * scale` from its config, frozen."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.scale = float(cfg.scaling_factor)
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, path: str | Path, subfolder: str = "vae", dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> VAECodec:
        from diffusers import AutoencoderKL

        folder = Path(path) / subfolder
        if not folder.is_dir():
            raise FileNotFoundError(f"no VAE folder at {folder}: pass a local diffusers-format FLUX.1 folder")
        vae = AutoencoderKL.from_pretrained(folder, torch_dtype=dtype).to(device)
        return cls(vae)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        latents = self.vae.encode(images.to(dtype)).latent_dist.mode()
        return ((latents - self.shift) * self.scale).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        images = self.vae.decode((latents / self.scale + self.shift).to(dtype)).sample
        return images.float().clamp(-1, 1)
