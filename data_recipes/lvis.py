"""LVIS (COCO-format JSON + the COCO 2017 images) -> grounding shards.

One sample per (image, category): the expression names the class ("the baseball bat", then its synonyms;
LVIS's disambiguators are dropped: "bow_(weapon)" is "the bow"),
`grounding.instances` lists every instance of it (for the all-instances overlay), the largest instance is
the target of box and mask overlays, and `grounding.unique` says whether it is the only one. Boxes become
`[x0, y0, x1, y1]` (exclusive) here; polygons are kept for mask overlays. LVIS v1 images carry `coco_url`
and no `file_name`; `--images` is the COCO folder (with train2017/ and val2017/, or flat).

    python -m data_recipes.lvis --input lvis_v1_train.json --images coco --output data/real/lvis
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

from data_recipes._cli import execute, make_parser, require_path, resolve_inputs
from data_recipes._coco import CocoIndex, clean_polygons, find_image, image_file_name, xywh_to_box
from data_recipes._grounding import grounding_block
from data_recipes._images import image_size, sniff_ext
from data_recipes._rows import RowContext, Sample, Skip
from data_recipes._sources import ListSource

NAME = "lvis"


def _name(text: str) -> str:
    """A class name as a prompt says it: LVIS tells homonyms apart in parentheses ("bow_(weapon)"), which no
    referring expression says: "the bow"."""
    spaced = text.replace("_", " ")
    return " ".join(re.sub(r"\([^)]*\)", " ", spaced).split()) or " ".join(spaced.split())


class LvisConverter:
    def __init__(self, coco: CocoIndex, images, max_instances: int | None = None,
                 max_categories: int | None = None):
        self.coco, self.images = coco, images
        self.max_instances, self.max_categories = max_instances, max_categories

    def __call__(self, row: dict[str, Any], ctx: RowContext) -> Iterator[Sample]:
        image = row["image"]
        anns = self.coco.anns.get(image["id"], [])
        if not anns:
            raise Skip("no annotations")
        path = find_image(self.images, image_file_name(image), ("train2017", "val2017"))
        data = path.read_bytes()
        ext = sniff_ext(data)
        width, height = image_size(data)
        if image.get("width") and (image["width"], image["height"]) != (width, height):
            raise Skip("image size differs from annotation")
        by_cat: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for a in anns:
            by_cat[a["category_id"]].append(a)
        cats = sorted(by_cat)
        if self.max_categories and len(cats) > self.max_categories:
            cats = sorted(ctx.rng.sample(cats, self.max_categories))
        for cat_id in cats:
            category = self.coco.categories.get(cat_id, {"name": str(cat_id)})
            cls = _name(category["name"])
            objects, areas = [], []
            for a in by_cat[cat_id]:
                try:
                    box = xywh_to_box(a.get("bbox"), width, height)
                except Skip as s:
                    ctx.skip(f"instance dropped: {s.reason}")
                    continue
                objects.append({"class": cls, "box": box,
                                "polygon": clean_polygons(a.get("segmentation"), width, height)})
                areas.append(a.get("area") or (box[2] - box[0]) * (box[3] - box[1]))
            if not objects:
                ctx.skip("category without a valid instance")
                continue
            if self.max_instances and len(objects) > self.max_instances:
                ctx.skip("too many instances")
                continue
            target = max(range(len(objects)), key=areas.__getitem__)
            synonyms = [_name(s) for s in category.get("synonyms", [])]
            expressions = list(dict.fromkeys([f"the {cls}"] + [f"the {s}" for s in synonyms]))
            record = {"task": "grounding", "prompt": expressions[0], "width": width, "height": height,
                      "dataset": NAME, "objects": objects,
                      "grounding": grounding_block(expressions, cls, objects, target, unique=len(objects) == 1,
                                                   image_id=image["id"], category_id=cat_id)}
            yield Sample(ctx.key(cat_id), record, {f"image.{ext}": data})


def main(argv: Sequence[str] | None = None):
    p = make_parser(NAME, __doc__, shard_size=200)
    p.add_argument("--images", required=True, help="COCO image folder")
    p.add_argument("--max-instances", type=int, default=None, help="drop categories with more instances")
    p.add_argument("--max-categories", type=int, default=None,
                   help="at most this many (random) categories per image")
    args = p.parse_args(argv)
    coco = CocoIndex.load(resolve_inputs(args.input, (".json",)))
    convert = LvisConverter(coco, require_path(args.images, "--images (COCO image folder)"),
                            args.max_instances, args.max_categories)
    source = ListSource([{"image": coco.images[i]} for i in coco.image_ids])
    return execute(args, NAME, source, convert)


if __name__ == "__main__":
    main()
