"""RefCOCO / RefCOCO+ / RefCOCOg -> grounding shards.

Three inputs:

* the original release (what most users have, from the `refer` toolkit): a folder `refcoco/`, `refcoco+/` or
  `refcocog/` holding `refs(unc).p` / `refs(umd).p` / `refs(google).p` (a pickled list of refs: `ref_id`,
  `ann_id`, `image_id`, `category_id`, `split`, `sentences`) and `instances.json` (COCO format: the images, every
  instance in them, the categories), with the COCO train2014 images under `--images`. Give the folder (the refs
  file is the dataset's usual split, `--split-by` picks another) or the refs file itself;
* the annotation tables (`jxu124/refcoco`, `jxu124/refcocoplus`, `jxu124/refcocog`): one row per referred
  object, `image_path` into COCO train2014 (give the folder with `--images`), `sentences`, `category_id`,
  `raw_anns` (the COCO annotation as JSON: its `bbox` and `segmentation` are used) and `raw_image_info`.
  `--coco-instances instances_train2014.json` adds every instance of the referred class, for the
  all-instances overlay (without it the referred object is the only instance listed);
* the evaluation tables that carry images (`lmms-lab/RefCOCO`, `lmms-lab/RefCOCOg`): `image`, `answer`
  (the expressions), `bbox`, `segmentation`; written as benchmark shards (an `eval` block).

Boxes become `[x0, y0, x1, y1]` (exclusive) once, here. The box is taken from `raw_anns` (COCO x, y, w, h)
when present; the table's own `bbox` column is read as `--bbox-format` (default xywh).

    python -m data_recipes.refcoco --input refer/data/refcocog --images coco/train2014 --dataset refcocog \\
        --output data/real/refcocog
    python -m data_recipes.refcoco --input 'refcoco/data/train-*.parquet' --images coco --dataset refcoco \\
        --coco-instances coco/annotations/instances_train2014.json --output data/real/refcoco
    python -m data_recipes.refcoco --input 'RefCOCO/data/val-*.parquet' --output data/eval/refcoco_val
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from data_recipes._cli import execute, fail, make_parser, require_path, resolve_inputs
from data_recipes._coco import COCO_NAMES, CocoIndex, clean_polygons, find_image, xywh_to_box, xyxy_to_box
from data_recipes._grounding import grounding_block
from data_recipes._images import encoded_image, image_size, sniff_ext
from data_recipes._rows import RowContext, Sample, Skip, clean_text
from data_recipes._sources import ListSource, ParquetSource

NAME = "refcoco"
DATASETS = ("refcoco", "refcoco+", "refcocog")
SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}  # the refs file each is usually used with


def table_box(bbox: Sequence[float] | None, fmt: str, width: int, height: int) -> list[int]:
    if bbox is None or len(bbox) < 4:
        raise Skip("missing box")
    return xywh_to_box(bbox, width, height) if fmt == "xywh" else xyxy_to_box(bbox, width, height)


def _json(text: Any) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _expressions(row: dict[str, Any]) -> list[str]:
    texts = [clean_text(s.get("sent") or s.get("raw")) for s in row.get("sentences") or [] if s]
    texts = list(dict.fromkeys(t for t in texts if t))
    if not texts:
        raise Skip("empty sentence list")
    return texts


class RefCocoAnnotations:
    """Rows of the annotation tables, images from a COCO folder."""

    def __init__(self, images: Path, dataset: str, bbox_format: str = "xywh", coco: CocoIndex | None = None,
                 split: str | None = None):
        self.images, self.dataset, self.bbox_format, self.coco, self.split = images, dataset, bbox_format, coco, split

    def _class(self, cat_id: int) -> str:
        return self.coco.category_name(cat_id) if self.coco else COCO_NAMES.get(cat_id, str(cat_id))

    def __call__(self, row: dict[str, Any], ctx: RowContext) -> Iterator[Sample]:
        if self.split and row.get("split") != self.split:
            raise Skip("split not selected")
        expressions = _expressions(row)
        path = find_image(self.images, str(row.get("image_path") or row.get("file_name") or ""),
                          ("train2014", "coco/train2014", "images/train2014"))
        data = path.read_bytes()
        ext = sniff_ext(data)
        info = _json(row.get("raw_image_info")) or {}
        width, height = image_size(data)
        if info.get("width") and (info["width"], info["height"]) != (width, height):
            raise Skip("image size differs from annotation")
        ann = _json(row.get("raw_anns"))
        if ann and ann.get("bbox"):
            box = xywh_to_box(ann["bbox"], width, height)
        else:
            box = table_box(row.get("bbox"), self.bbox_format, width, height)
        cls = self._class(int(row["category_id"]))
        target = {"class": cls, "box": box,
                  "polygon": clean_polygons(ann.get("segmentation") if ann else None, width, height)}
        objects = [target]
        if self.coco is not None:
            objects = self._instances(row, target, width, height, ctx)
        ti = next(i for i, o in enumerate(objects) if o is target)
        ids = {"ref_id": row.get("ref_id"), "ann_id": row.get("ann_id"), "image_id": row.get("image_id")}
        record = {"task": "grounding", "prompt": expressions[0], "width": width, "height": height,
                  "dataset": self.dataset, "origin": {"split": row.get("split")}, "objects": objects,
                  "grounding": grounding_block(expressions, cls, objects, ti, unique=True, **ids)}
        yield Sample(ctx.key(), record, {f"image.{ext}": data})

    def _instances(self, row, target, width, height, ctx) -> list[dict[str, Any]]:
        """Every non-crowd instance of the referred class in the image; the referred one keeps its place."""
        objects = []
        for a in self.coco.anns.get(int(row["image_id"]), []):
            if a.get("category_id") != row["category_id"] or a.get("iscrowd"):
                continue
            if a.get("id") == row.get("ann_id"):
                objects.append(target)
                continue
            try:
                objects.append({"class": target["class"], "box": xywh_to_box(a.get("bbox"), width, height),
                                "polygon": clean_polygons(a.get("segmentation"), width, height)})
            except Skip as s:
                ctx.skip(f"instance dropped: {s.reason}")
        if not any(o is target for o in objects):
            objects.insert(0, target)
        return objects


class RefCocoEval:
    """Rows of the evaluation tables with images (lmms-lab)."""

    def __init__(self, dataset: str, split: str):
        self.dataset, self.split = dataset, split

    def __call__(self, row: dict[str, Any], ctx: RowContext) -> Iterator[Sample]:
        expressions = list(dict.fromkeys(t for t in (clean_text(a) for a in row.get("answer") or []) if t))
        if not expressions:
            raise Skip("empty expression list")
        data, ext, (width, height) = encoded_image(row.get("image"))
        box = xywh_to_box(row.get("bbox"), width, height)
        target = {"class": "", "box": box, "polygon": clean_polygons(row.get("segmentation"), width, height)}
        record = {"task": "grounding", "prompt": expressions[0], "width": width, "height": height,
                  "dataset": self.dataset, "objects": [target],
                  "grounding": grounding_block(expressions, "", [target], 0, unique=True,
                                               question_id=row.get("question_id"), file_name=row.get("file_name")),
                  "eval": {"benchmark": self.dataset, "split": self.split, "has_target": False}}
        yield Sample(ctx.key(), record, {f"image.{ext}": data})


# ------------------------------------------------------------------------------------ the original release


class _RefsUnpickler(pickle.Unpickler):
    """Refs files are (Python 2) pickles of plain lists and dicts: nothing else may be built from one."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"a refs file should hold only lists and dicts, not {module}.{name}")


def _text(value: Any) -> Any:
    """Python 2 `str` sentences come back decoded as Latin-1: recover their UTF-8."""
    if isinstance(value, str):
        try:
            return value.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            return value
    return value


def find_refs(specs: Sequence[str], dataset: str, split_by: str | None) -> Path | None:
    """The `refs(*).p` among the inputs (the file itself, or the one in a folder); None for table inputs."""
    for spec in specs:
        path = Path(spec)
        if path.is_file() and path.name.startswith("refs(") and path.suffix == ".p":
            return path
        if path.is_dir() and (found := sorted(path.glob("refs(*).p"))):
            want = path / f"refs({split_by or SPLIT_BY[dataset]}).p"
            if want.is_file():
                return want
            if len(found) == 1 and split_by is None:
                return found[0]
            fail(f"{path} holds {', '.join(f.name for f in found)}, not {want.name}: pick one with --split-by")
    return None


def original_rows(refs_path: Path, coco: CocoIndex) -> list[dict[str, Any]]:
    """The refs of the original release as rows of the annotation tables (the same converter reads both)."""
    try:
        with open(refs_path, "rb") as f:
            refs = _RefsUnpickler(f, encoding="latin-1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        fail(f"{refs_path}: not a refs file ({e})")
    anns = {a["id"]: a for per_image in coco.anns.values() for a in per_image}
    rows = []
    for ref in refs:
        image = coco.images.get(ref.get("image_id")) or {}
        ann = anns.get(ref.get("ann_id"))
        sentences = [{k: _text(v) for k, v in sent.items()} for sent in ref.get("sentences") or []]
        rows.append({"image_path": image.get("file_name", ""), "sentences": sentences,
                     "category_id": ref.get("category_id"), "split": ref.get("split"),
                     "raw_anns": json.dumps(ann) if ann else None,
                     "raw_image_info": json.dumps({k: image[k] for k in ("width", "height") if k in image}),
                     "ref_id": ref.get("ref_id"), "ann_id": ref.get("ann_id"), "image_id": ref.get("image_id")})
    return rows


def main(argv: Sequence[str] | None = None):
    p = make_parser(NAME, __doc__)
    p.add_argument("--dataset", choices=DATASETS, default="refcoco", help="name written in the records")
    p.add_argument("--images", default=None, help="COCO image folder (annotation tables only)")
    p.add_argument("--coco-instances", nargs="*", default=None,
                   help="COCO instances JSON(s), for all instances of the referred class")
    p.add_argument("--bbox-format", choices=("xywh", "xyxy"), default="xywh",
                   help="how to read the table's bbox column when raw_anns has no box")
    p.add_argument("--split", default=None, help="annotation tables and refs: keep rows of this split; eval tables: "
                                                 "the split name for the eval block (default val)")
    p.add_argument("--split-by", choices=("unc", "umd", "google"), default=None,
                   help="original release: which refs(...).p (default: unc for refcoco/refcoco+, umd for refcocog)")
    args = p.parse_args(argv)
    refs = find_refs(args.input, args.dataset, args.split_by)
    if refs is not None:
        coco = CocoIndex.load([require_path(refs.parent / "instances.json", "instances.json beside the refs file")])
        convert = RefCocoAnnotations(require_path(args.images, "--images (COCO train2014 folder)"), args.dataset,
                                     args.bbox_format, coco, args.split)
        return execute(args, NAME, ListSource(original_rows(refs, coco)), convert)
    source = ParquetSource(resolve_inputs(args.input, (".parquet",)))
    if "image_path" in source.schema_names:
        coco = CocoIndex.load([require_path(c, "COCO instances JSON") for c in args.coco_instances or []]) \
            if args.coco_instances else None
        convert = RefCocoAnnotations(require_path(args.images, "--images (COCO image folder)"), args.dataset,
                                     args.bbox_format, coco, args.split)
    elif "image" in source.schema_names:
        convert = RefCocoEval(args.dataset, args.split or "val")
    else:
        fail("neither a RefCOCO annotation table (image_path) nor an evaluation table (image)")
    return execute(args, NAME, source, convert)


if __name__ == "__main__":
    main()
