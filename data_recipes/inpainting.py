"""Inpainting sources -> inpainting shards. Masks are drawn on the fly by the task builder; this recipe
stores what they are drawn from.

* text-to-image webdataset tars (`jackyhate/text-to-image-2M`: `{key}.jpg` + `{key}.json` with `prompt`):
  the image is copied through, the prompt kept. These images have no object annotations, so the builder
  draws random and irregular masks for them.
* COCO-format instance annotations (COCO instances / COCO-Stuff JSON, ADE20k in COCO format) plus their
  image folder (`--images`): every object becomes an entry of `objects` (class, box, polygon) and an id in
  `instances.png` (0 = background, i = objects[i-1], larger objects drawn first), for object-shaped masks.
  The prompt is a COCO caption (`--captions captions_train2017.json`, one drawn per image) or else a list of
  the classes in the image.

    python -m data_recipes.inpainting --input text-to-image-2M/data_512_2M --output data/real/inpainting_t2i
    python -m data_recipes.inpainting --input coco/annotations/instances_train2017.json --images coco/train2017 \\
        --captions coco/annotations/captions_train2017.json --output data/real/inpainting_coco
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_recipes._cli import execute, fail, make_parser, require_path, resolve_inputs
from data_recipes._coco import (
    CocoIndex,
    clean_polygons,
    find_image,
    image_file_name,
    segmentation_mask,
    xywh_to_box,
)
from data_recipes._images import encode_png, encoded_image, image_size, sniff_ext
from data_recipes._rows import RowContext, Sample, Skip, clean_text
from data_recipes._sources import ListSource, TarSource

NAME = "inpainting"
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
MAX_OBJECTS = 255  # ids of a single-channel instance map


class TarPromptConverter:
    """A webdataset sample with an image and a JSON (or txt) prompt."""

    def __init__(self, dataset: str):
        self.dataset = dataset

    def __call__(self, row: dict[str, Any], ctx: RowContext) -> Iterator[Sample]:
        field = next((f for f in IMAGE_FIELDS if f in row), None)
        if field is None:
            raise Skip("no image member")
        data, ext, (width, height) = encoded_image(row[field])
        prompt = ""
        if row.get("json"):
            try:
                meta = json.loads(row["json"])
            except ValueError as e:
                raise Skip("unreadable json") from e
            prompt = clean_text(meta.get("prompt") if isinstance(meta, dict) else None)
        if not prompt and row.get("txt"):
            prompt = clean_text(row["txt"].decode("utf-8", "replace"))
        if not prompt:
            raise Skip("missing prompt")
        record = {"task": "inpainting", "prompt": prompt, "caption": prompt, "width": width, "height": height,
                  "dataset": self.dataset, "origin": {"key": row.get("__key__"), "tar": Path(str(row.get("__url__"))).name}}
        yield Sample(ctx.key(), record, {f"image.{ext}": data})


def _class_prompt(names: list[str]) -> str:
    unique = list(dict.fromkeys(names))[:6]
    if not unique:
        return "a photo"
    listed = ", ".join(f"a {n}" for n in unique[:-1])
    return f"a photo of {listed + ' and ' if listed else ''}a {unique[-1]}"


class CocoInstancesConverter:
    def __init__(self, coco: CocoIndex, images: Path, dataset: str, captions: dict[int, list[str]] | None = None,
                 min_area: float = 64.0, keep_crowd: bool = False):
        self.coco, self.images, self.dataset = coco, images, dataset
        self.captions, self.min_area, self.keep_crowd = captions or {}, min_area, keep_crowd

    def __call__(self, row: dict[str, Any], ctx: RowContext) -> Iterator[Sample]:
        image = row["image"]
        path = find_image(self.images, image_file_name(image), ("train2017", "val2017", "images"))
        data = path.read_bytes()
        ext = sniff_ext(data)
        width, height = image_size(data)
        if image.get("width") and (image["width"], image["height"]) != (width, height):
            raise Skip("image size differs from annotation")
        kept = []
        for a in self.coco.anns.get(image["id"], []):
            if a.get("iscrowd") and not self.keep_crowd:
                continue
            try:
                box = xywh_to_box(a.get("bbox"), width, height)
                mask = segmentation_mask(a.get("segmentation"), width, height)
            except Skip as s:
                ctx.skip(f"object dropped: {s.reason}")
                continue
            area = int(mask.sum())
            if area < self.min_area:
                ctx.skip("object dropped: smaller than --min-object-area")
                continue
            kept.append((area, a, box, mask))
        if not kept:
            raise Skip("no usable object")
        kept.sort(key=lambda k: -k[0])  # large first, so small objects stay visible on top
        if len(kept) > MAX_OBJECTS:
            ctx.skip("object dropped: more than 255 in the image")
            kept = kept[:MAX_OBJECTS]
        instances = np.zeros((height, width), np.uint8)
        objects = []
        for i, (area, a, box, mask) in enumerate(kept, start=1):
            instances[mask] = i
            obj = {"class": self.coco.category_name(a["category_id"]), "box": box, "area": area,
                   "polygon": clean_polygons(a.get("segmentation"), width, height)}
            if a.get("iscrowd"):
                obj["crowd"] = True
            objects.append(obj)
        captions = self.captions.get(image["id"])
        prompt = ctx.rng.choice(captions) if captions else _class_prompt([o["class"] for o in objects])
        record = {"task": "inpainting", "prompt": prompt, "caption": prompt, "width": width, "height": height,
                  "dataset": self.dataset, "objects": objects, "origin": {"image_id": image["id"]}}
        yield Sample(ctx.key(), record, {f"image.{ext}": data, "instances.png": encode_png(instances)})


def load_captions(paths: Sequence[str]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = defaultdict(list)
    for p in paths:
        for a in json.loads(require_path(p, "captions JSON").read_text()).get("annotations", []):
            text = clean_text(a.get("caption"))
            if text:
                out[a["image_id"]].append(text)
    return out


def main(argv: Sequence[str] | None = None):
    p = make_parser(NAME, __doc__)
    p.add_argument("--images", default=None, help="image folder of COCO-format annotations")
    p.add_argument("--captions", nargs="*", default=None, help="COCO captions JSON(s) for the prompts")
    p.add_argument("--dataset", default=None, help="name written in the records (default: from the input)")
    p.add_argument("--min-object-area", type=float, default=64.0, help="pixels; smaller objects are dropped")
    p.add_argument("--keep-crowd", action="store_true", help="keep crowd annotations as objects")
    args = p.parse_args(argv)
    inputs = resolve_inputs(args.input, (".tar", ".json"))
    tars = [x for x in inputs if x.name.endswith(".tar")]
    jsons = [x for x in inputs if x.name.endswith(".json")]
    if tars and jsons:
        fail("give either webdataset tars or COCO-format JSON, not both")
    if tars:
        source, convert = TarSource(tars), TarPromptConverter(args.dataset or "text-to-image-2M")
    else:
        coco = CocoIndex.load(jsons)
        source = ListSource([{"image": coco.images[i]} for i in coco.image_ids])
        convert = CocoInstancesConverter(coco, require_path(args.images, "--images (image folder)"),
                                         args.dataset or "coco", load_captions(args.captions or []),
                                         args.min_object_area, args.keep_crowd)
    return execute(args, NAME, source, convert)


if __name__ == "__main__":
    main()
