"""Image helpers of the converters: sniff and size encoded bytes, decode, re-encode (PNG, JPEG), masks and maps.

Encoded images are copied through untouched where possible; what cannot be decoded raises `Skip`.
"""

from __future__ import annotations

import io
import os
from typing import Any

import cv2
import numpy as np
from PIL import Image

from data_recipes._rows import Skip

_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"))


def sniff_ext(data: bytes) -> str:
    """The file extension for encoded image bytes, from their magic number (file names in releases lie)."""
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise Skip("unsupported image format")


def image_bytes(value: Any, what: str = "image") -> bytes:
    """Bytes of a parquet image struct `{bytes, path}` (or raw bytes); Skip when missing.

    A struct without bytes whose `path` is an absolute path to a file is read from disk: that is how
    the folder-based releases (MagicBrush test, DreamBench) are fed through the same converters.
    """
    if isinstance(value, dict):
        path = value.get("path")
        value = value.get("bytes")
        if not value and path and os.path.isabs(path) and os.path.isfile(path):
            with open(path, "rb") as f:
                value = f.read()
    if not value:
        raise Skip(f"missing {what} bytes")
    return bytes(value)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header alone; Skip when it cannot be parsed."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception as e:  # PIL raises several types for broken headers
        raise Skip("unreadable image") from e


def encoded_image(value: Any, what: str = "image") -> tuple[bytes, str, tuple[int, int]]:
    """(bytes, extension, (width, height)) of an image column value, copied through untouched."""
    data = image_bytes(value, what)
    return data, sniff_ext(data), image_size(data)


def decode_image(data: bytes, mode: str = "RGB") -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as e:
        raise Skip("unreadable image") from e
    return im.convert(mode) if im.mode != mode else im


def encode_png(im: Image.Image | np.ndarray) -> bytes:
    """A PNG of a PIL image or an HxW / HxWx3 / HxWx4 array (RGB order), fast rather than small.

    8- and 16-bit arrays go through OpenCV (4x to 10x faster than PIL on ShapeWorld's 32 x 32 scenes and
    masks, 2x on large masks), with its default settings so ShapeWorld's shards keep their bytes; PIL images
    and other arrays through PIL at compression level 1 (these are masks and maps, they compress well anyway).
    """
    if isinstance(im, np.ndarray):
        if im.dtype in (np.uint8, np.uint16) and (im.ndim == 2 or (im.ndim == 3 and im.shape[2] in (1, 3, 4))):
            if im.ndim == 3 and im.shape[2] >= 3:
                im = cv2.cvtColor(im, cv2.COLOR_RGB2BGR if im.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
            ok, buf = cv2.imencode(".png", im)
            if not ok:
                raise RuntimeError("PNG encoding failed")
            return buf.tobytes()
        im = Image.fromarray(im)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_jpeg(im: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 chroma: no colour bleeding at object edges, which the grounding/editing targets care about.
    im.convert("RGB").save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def single_channel_png(data: bytes) -> bytes:
    """A map as a single-channel PNG: copied when it already is one, else converted (RGB maps are grey anyway)."""
    if data.startswith(b"\x89PNG"):
        with Image.open(io.BytesIO(data)) as im:
            if im.mode in ("L", "I;16", "I"):
                return data
    return encode_png(decode_image(data, "L"))


def rgb_png(data: bytes) -> bytes:
    """A colour map as an RGB PNG: copied when it already is one (a JPEG colour map would blur class colours)."""
    if data.startswith(b"\x89PNG"):
        with Image.open(io.BytesIO(data)) as im:
            if im.mode == "RGB":
                return data
    return encode_png(decode_image(data, "RGB"))


def white_region_mask(data: bytes, size: tuple[int, int] | None = None, threshold: int = 250,
                      painted_on: bytes | None = None, edited: bytes | None = None, edit_tolerance: int = 16) -> bytes:
    """A region painted white (all channels >= threshold) as a 0/255 single-channel PNG, for both encodings:

    * white on black (UltraEdit's region masks, and any binary mask): every white pixel, whatever the source;
    * painted on the source (MagicBrush's `mask_img`: the source with the edited region painted white; give the
      source as `painted_on`): the white pixels that differ from the source, and those where the source was
      already white (sky, a wall) but the edit changed it (give the target as `edited`). A source pixel that was
      white and that the edit left as it was is the one case the two images cannot tell apart: it counts as
      outside. A copy that differs from the source almost everywhere (re-encoded) is read by white alone.

    Transparent pixels are not part of a painted region. Skip when the size disagrees or the mask is empty.
    """
    im = decode_image(data, "RGBA")
    if size is not None and im.size != tuple(size):
        raise Skip("mask size differs from image")
    arr = np.asarray(im)
    rgb = arr[..., :3]
    white = (rgb.min(axis=-1) >= threshold) & (arr[..., 3] > 0)
    black = rgb.max(axis=-1) <= 255 - threshold
    region = white
    # a binary mask is white on black whatever the source holds (anti-aliased edges aside)
    if painted_on is not None and (white | black).mean() < 0.995:
        src = np.asarray(decode_image(painted_on, "RGB"))
        if src.shape == rgb.shape:
            differs = (src != rgb).any(axis=-1)
            if differs.mean() < 0.99:  # a painted copy, not a re-encoded one
                region = white & differs
                tgt = np.asarray(decode_image(edited, "RGB")) if edited is not None else None
                if tgt is not None and tgt.shape == src.shape:
                    changed = np.abs(tgt.astype(np.int16) - src.astype(np.int16)).max(axis=-1) > edit_tolerance
                    region |= white & ~differs & changed
    if not region.any():
        raise Skip("empty mask")
    return encode_png((region * 255).astype(np.uint8))
