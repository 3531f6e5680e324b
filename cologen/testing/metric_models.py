"""Tiny randomly initialised stand-ins for the benchmark networks, saved to a local folder.

They let tests and smoke runs exercise the exact loading and scoring path a real evaluation
uses (``save_pretrained`` folders, TorchScript files) without any download. Their scores mean
nothing; only their shapes and plumbing are real.
"""

from __future__ import annotations

import string
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    DPTConfig,
    DPTForDepthEstimation,
    DPTImageProcessor,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    SegformerImageProcessor,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

IMAGE_SIZE = 32


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def save_tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """A two-layer CLIP with a character-level BPE tokenizer (no merges), 32 px images."""
    _seeded(seed)
    path = Path(path)
    chars = string.ascii_lowercase + string.digits
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def save_tiny_dino(path: str | Path, seed: int = 0) -> Path:
    """A one-layer ViT with 16 px patches (the DINO ViT-S/16 layout, shrunk), 32 px images."""
    _seeded(seed)
    path = Path(path)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=IMAGE_SIZE,
        patch_size=16,
    )
    ViTModel(config).save_pretrained(path)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)
    return path


def save_tiny_depth(path: str | Path, seed: int = 0) -> Path:
    """A four-layer DPT depth network, 32 px input."""
    _seeded(seed)
    path = Path(path)
    config = DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=IMAGE_SIZE,
        patch_size=8,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
    )
    DPTForDepthEstimation(config).save_pretrained(path)
    DPTImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, keep_aspect_ratio=False
    ).save_pretrained(path)
    return path


def save_tiny_segmenter(path: str | Path, num_labels: int = 5, seed: int = 0) -> Path:
    """A two-stage SegFormer with ``num_labels`` classes, 32 px input."""
    _seeded(seed)
    path = Path(path)
    config = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        num_attention_heads=[1, 2],
        decoder_hidden_size=16,
        num_labels=num_labels,
        patch_sizes=[7, 3],
        strides=[4, 2],
        mlp_ratios=[2, 2],
    )
    SegformerForSemanticSegmentation(config).save_pretrained(path)
    SegformerImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)
    return path


class _TinyMapNet(nn.Module):
    """Image in [0, 1] to a one-channel map in [0, 1] (a stand-in for HED / lineart)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(x))


class _TinyInception(nn.Module):
    """Called like the FID Inception TorchScript: float 0-255 images, ``return_features``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 5, stride=4)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        feats = torch.relu(self.conv(x / 127.5 - 1.0)).mean(dim=(2, 3))
        return feats if return_features else self.fc(feats)


def _save_script(module: nn.Module, path: str | Path) -> Path:
    # TorchScript is deprecated in recent torch, but it is the format the FID Inception ships in.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(module).save(str(path))
    return Path(path)


def save_tiny_map_detector(path: str | Path, seed: int = 0) -> Path:
    _seeded(seed)
    return _save_script(_TinyMapNet(), path)


def save_tiny_inception(path: str | Path, seed: int = 0) -> Path:
    _seeded(seed)
    return _save_script(_TinyInception(), path)
