"""Annotator models for control maps that need a network (HED soft edges, lineart), loaded from local weights.

The standard ControlNet annotator checkpoints (lllyasviel/Annotators) load as they are:
`hed` takes `ControlNetHED.pth` (the Apache-2.0 HED of ControlNet 1.1), `lineart` takes `sk_model.pth`
or `sk_model2.pth` (the informative-drawings generator). The module layouts below mirror those checkpoints'
parameter names. Weights are never downloaded: set `builder.annotator_weights: {hed: PATH, lineart: PATH}`.

Extension point: add a loader to `ANNOTATORS` (name -> callable(path) -> Annotator), where an Annotator
maps an RGB uint8 image (H, W, 3) to a uint8 map (H, W), 255 = edge / line.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

Annotator = Callable[[np.ndarray], np.ndarray]


class _HEDBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int):
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1) for i in range(layers)])
        self.projection = nn.Conv2d(cout, 1, 1)

    def forward(self, x: torch.Tensor, down: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if down:
            x = F.max_pool2d(x, 2, 2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class HEDNet(nn.Module):
    """ControlNet 1.1's HED: five VGG-like stages, one side output each; RGB input in 0..255."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.block1 = _HEDBlock(3, 64, 2)
        self.block2 = _HEDBlock(64, 128, 2)
        self.block3 = _HEDBlock(128, 256, 3)
        self.block4 = _HEDBlock(256, 512, 3)
        self.block5 = _HEDBlock(512, 512, 3)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, sides = x - self.norm, []
        for i, block in enumerate((self.block1, self.block2, self.block3, self.block4, self.block5)):
            h, side = block(h, down=i > 0)
            sides.append(side)
        return sides


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c), nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class LineartNet(nn.Module):
    """The informative-drawings generator (3 residual blocks) used by ControlNet's lineart annotator."""

    def __init__(self, n_residual: int = 3) -> None:
        super().__init__()
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, 64, 7), nn.InstanceNorm2d(64), nn.ReLU(True))
        self.model1 = nn.Sequential(
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.InstanceNorm2d(128), nn.ReLU(True),
            nn.Conv2d(128, 256, 3, stride=2, padding=1), nn.InstanceNorm2d(256), nn.ReLU(True))
        self.model2 = nn.Sequential(*[_Residual(256) for _ in range(n_residual)])
        self.model3 = nn.Sequential(
            nn.ConvTranspose2d(256, 128, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(128),
            nn.ReLU(True),
            nn.ConvTranspose2d(128, 64, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(64),
            nn.ReLU(True))
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(64, 1, 7), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))


def _load(net: nn.Module, path: str, field: str) -> nn.Module:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"builder.annotator_weights.{field}: no file at {path!r}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net.eval().float()


def load_hed(path: str) -> Annotator:
    net = _load(HEDNet(), path, "hed")

    @torch.no_grad()
    def run(rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        x = torch.from_numpy(np.ascontiguousarray(rgb)).float().permute(2, 0, 1)[None]
        sides = [cv2.resize(s[0, 0].numpy(), (w, h), interpolation=cv2.INTER_LINEAR) for s in net(x)]
        edge = 1 / (1 + np.exp(-np.mean(np.stack(sides, 2), axis=2, dtype=np.float64)))
        return (edge * 255).clip(0, 255).astype(np.uint8)

    return run


def load_lineart(path: str) -> Annotator:
    net = _load(LineartNet(), path, "lineart")

    @torch.no_grad()
    def run(rgb: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(rgb)).float().permute(2, 0, 1)[None] / 255.0
        line = net(x)[0, 0].numpy()  # 1 = paper, 0 = ink
        return 255 - (line * 255).clip(0, 255).astype(np.uint8)  # ControlNet's convention: white lines

    return run


ANNOTATORS: dict[str, Callable[[str], Annotator]] = {"hed": load_hed, "lineart": load_lineart}
