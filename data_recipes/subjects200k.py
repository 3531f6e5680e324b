"""Subjects200K (`Yuanshi/Subjects200K` and `Yuanshi/Subjects200K_collection3` parquet) -> customized-generation
shards.

A composite holds two square views of one subject side by side, padded: with views of side `s` and padding `p`
it is (2s + 4p) x (s + 2p), and the views are cropped at (p, p, p + s, p + s) and (s + 2p, p, 2s + 2p, p + s)
(OminiControl's crops). Collections 1 and 2 are 1056 x 528: s = 512, p = 8, so (8, 8, 520, 520) and
(528, 8, 1040, 520). The size is read from each image, not assumed: a composite must be twice as wide as high,
and its padding is the least p for which the view side s is a multiple of 64 (the generators' sizes: 528 -> 8,
1040 -> 8, 1024 -> 0), or `--padding`. So collection 3's 1024-pixel views convert as they are.

Every kept row gives two samples, one per direction: the target is one half (its description is the prompt),
the source (the subject reference) is the other half. The halves are cropped, so they are re-encoded: JPEG
quality 95 with 4:4:4 chroma by default, or PNG (`--crop-format png`).

`--second-condition canny` makes two-condition samples (docs/multi_condition.md): the subject reference as
`source`, and the canny map of the target view (OpenCV, thresholds 100 / 200, as the control builder draws it) as
`source.1.png`, with `conditions: [{role: subject}, {role: canny}]`: the subject placed as the edges say.

    python -m data_recipes.subjects200k --input 'Subjects200K/data/train-*.parquet' --output data/real/subjects200k
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from cologen.data.control import canny
from data_recipes._cli import execute, make_parser, resolve_inputs
from data_recipes._images import decode_image, encode_jpeg, encode_png, image_bytes
from data_recipes._rows import RowContext, Sample, Skip, clean_text
from data_recipes._sources import ParquetSource

NAME = "subjects200k"
VIEW_MULTIPLE = 64  # view sides are multiples of this (512, 1024): what tells the padding from the view
SCORES = ("compositeStructure", "objectConsistency", "imageQuality")
COLUMNS = ("image", "collection", "quality_assessment", "description")


def view_crops(width: int, height: int, padding: int | None = None) -> tuple[tuple[int, int, int, int], ...]:
    """The (left, right) view boxes `(x0, y0, x1, y1)` (exclusive) of a composite (see the module docstring)."""
    if width != 2 * height:
        raise Skip("composite is not two square views side by side")
    if padding is None:
        padding = next((p for p in range(height // 4) if (height - 2 * p) % VIEW_MULTIPLE == 0), None)
        if padding is None:
            raise Skip("composite size fits no view size")
    side = height - 2 * padding
    if side <= 0:
        raise Skip("padding leaves no view")
    return (padding, padding, padding + side, padding + side), \
        (side + 2 * padding, padding, 2 * side + 2 * padding, padding + side)


class Subjects200KConverter:
    def __init__(self, min_quality: int = 5, collections: Sequence[str] | None = None,
                 crop_format: str = "jpg", jpeg_quality: int = 95, keep_invalid_descriptions: bool = False,
                 padding: int | None = None, second_condition: str | None = None):
        if second_condition not in (None, "canny"):
            raise ValueError(f"second_condition must be 'canny' or None, got {second_condition!r}")
        self.padding, self.second_condition = padding, second_condition
        self.min_quality = min_quality
        self.collections = set(collections) if collections else None
        self.crop_format = crop_format
        self.jpeg_quality = jpeg_quality
        self.keep_invalid = keep_invalid_descriptions

    def _encode(self, im) -> tuple[str, bytes]:
        if self.crop_format == "png":
            return "png", encode_png(im)
        return "jpg", encode_jpeg(im, self.jpeg_quality)

    def __call__(self, row: dict[str, Any], ctx: RowContext) -> Iterator[Sample]:
        collection = row.get("collection")
        if self.collections is not None and collection not in self.collections:
            raise Skip("collection not selected")
        quality = row.get("quality_assessment")
        if self.min_quality > 0:
            if not quality:
                raise Skip("no quality assessment")
            if any((quality.get(k) is None or quality[k] < self.min_quality) for k in SCORES):
                raise Skip(f"quality < {self.min_quality}")
        desc = row.get("description") or {}
        texts = [clean_text(desc.get("description_0")), clean_text(desc.get("description_1"))]
        if not all(texts):
            raise Skip("missing description")
        if desc.get("description_valid") is False and not self.keep_invalid:
            raise Skip("description marked invalid")
        composite = decode_image(image_bytes(row.get("image")))
        crops = view_crops(*composite.size, self.padding)
        side = crops[0][2] - crops[0][0]
        halves = [self._encode(composite.crop(box)) for box in crops]
        subject_id = f"{NAME}-{ctx.index:09d}"
        for target in (0, 1):
            source = 1 - target
            (t_ext, t_bytes), (s_ext, s_bytes) = halves[target], halves[source]
            record = {
                "task": "customized", "prompt": texts[target], "caption": texts[target],
                "width": side, "height": side, "dataset": NAME,
                "subject": {"id": subject_id, "item": clean_text(desc.get("item")),
                            "category": clean_text(desc.get("category")),
                            "source_description": texts[source], "target_description": texts[target],
                            "target_half": ("left", "right")[target], "collection": collection},
            }
            if quality:
                record["quality"] = dict(quality)
            files = {f"image.{t_ext}": t_bytes, f"source.{s_ext}": s_bytes}
            if self.second_condition == "canny":
                view = np.asarray(composite.crop(crops[target]).convert("RGB"))
                files["source.1.png"] = encode_png(canny(view))
                record["conditions"] = [{"role": "subject"}, {"role": "canny"}]
            yield Sample(ctx.key(target), record, files)


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(NAME, __doc__, shard_size=500)
    p.add_argument("--min-quality", type=int, default=5,
                   help="keep rows whose three quality scores are all >= this (0 keeps unscored rows too)")
    p.add_argument("--collections", nargs="*", default=None, help="e.g. collection_2 (default: all)")
    p.add_argument("--crop-format", choices=("jpg", "png"), default="jpg")
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--keep-invalid-descriptions", action="store_true")
    p.add_argument("--padding", type=int, default=None,
                   help="pixels of padding around each view (default: read from the composite's size)")
    p.add_argument("--second-condition", choices=("canny",), default=None,
                   help="also store the target view's canny map as a second condition (source.1.png)")
    return p


def main(argv: Sequence[str] | None = None):
    args = build_parser().parse_args(argv)
    source = ParquetSource(resolve_inputs(args.input, (".parquet",)), columns=COLUMNS)
    convert = Subjects200KConverter(args.min_quality, args.collections, args.crop_format, args.jpeg_quality,
                                    args.keep_invalid_descriptions, args.padding, args.second_condition)
    return execute(args, NAME, source, convert)


if __name__ == "__main__":
    main()
