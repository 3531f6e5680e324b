"""Benchmark similarity metrics with pretrained encoders: CLIP-T, CLIP-I, CLIP direction, DINO.

Each takes the encoder already loaded (``load_clip`` / ``load_dino``, so a runner loads it once)
or a local path, and returns one cosine similarity per pair as a float tensor ``(N,)`` in
``[-1, 1]``. Pixel metrics (PSNR, SSIM, MS-SSIM, L1, RMSE) live in pixel.py, edge F1 in
edges.py, mIoU in segmentation.py, FID in fid.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
import torch.nn.functional as F

from cologen.metrics.images import ImageLike
from cologen.metrics.models import ClipEncoder, DinoEncoder, PathLike, load_clip, load_dino

ClipLike = Union[ClipEncoder, PathLike, None]
DinoLike = Union[DinoEncoder, PathLike, None]


def as_clip(clip: ClipLike) -> ClipEncoder:
    return clip if isinstance(clip, ClipEncoder) else load_clip(clip)


def as_dino(dino: DinoLike) -> DinoEncoder:
    return dino if isinstance(dino, DinoEncoder) else load_dino(dino)


def _check_pairs(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"expected pairs, got {len(a)} and {len(b)} items")


def clip_text_score(
    images: Sequence[ImageLike], texts: Sequence[str], clip: ClipLike, batch_size: int = 32
) -> torch.Tensor:
    """CLIP-T: cosine between each image's and its text's CLIP embedding (DreamBench reports the
    mean cosine, e.g. 0.315; "CLIP-score" as torchmetrics and ControlNet++ report it is
    ``100 * max(cosine, 0)``, see ``clip_score_100``)."""
    _check_pairs(images, texts)
    enc = as_clip(clip)
    return (enc.image_features(images, batch_size) * enc.text_features(texts, batch_size)).sum(-1)


def clip_score_100(cosine: torch.Tensor) -> torch.Tensor:
    """torchmetrics' CLIPScore scale: ``100 * max(cosine, 0)``."""
    return 100.0 * cosine.clamp(min=0)


def clip_image_score(
    images: Sequence[ImageLike], references: Sequence[ImageLike], clip: ClipLike, batch_size: int = 32
) -> torch.Tensor:
    """CLIP-I: cosine between the CLIP image embeddings of each image and its reference."""
    _check_pairs(images, references)
    enc = as_clip(clip)
    return (enc.image_features(images, batch_size) * enc.image_features(references, batch_size)).sum(-1)


def clip_direction_score(
    sources: Sequence[ImageLike],
    outputs: Sequence[ImageLike],
    source_captions: Sequence[str],
    target_captions: Sequence[str],
    clip: ClipLike,
    batch_size: int = 32,
) -> torch.Tensor:
    """CLIP-dir (Emu Edit, InstructPix2Pix): cosine between the change in image embedding
    (output - source) and the change in caption embedding (target - source caption)."""
    _check_pairs(sources, outputs)
    _check_pairs(source_captions, target_captions)
    enc = as_clip(clip)
    d_img = enc.image_features(outputs, batch_size) - enc.image_features(sources, batch_size)
    d_txt = enc.text_features(target_captions, batch_size) - enc.text_features(source_captions, batch_size)
    return F.cosine_similarity(d_img, d_txt, dim=-1)


def dino_score(
    images: Sequence[ImageLike], references: Sequence[ImageLike], dino: DinoLike, batch_size: int = 32
) -> torch.Tensor:
    """DINO: cosine between the DINO CLS embeddings of each image and its reference."""
    _check_pairs(images, references)
    enc = as_dino(dino)
    return (enc.image_features(images, batch_size) * enc.image_features(references, batch_size)).sum(-1)
