"""MultiGen-20M (ControlNet++'s parquet copies) -> controllable-generation shards.

The kind of table is told by its columns:

* depth (`limingcv/MultiGen-20M_depth`, `..._depth_eval`): `image`, `control_depth`, `text` -> `depth.png`;
* segmentation (`limingcv/Captioned_ADE20K`, `limingcv/Captioned_COCOStuff`): `image`, `control_seg` (colour
  map) -> `seg.png`, `seg_map` (label ids, for mIoU) -> `labels.png`, `prompt`;
* edges (`limingcv/MultiGen-20M_canny_eval` and the plain image tables): `image`, `text`; canny, HED and
  lineart are computed from the image by the task builders (`--types`).

Images are copied through; maps are stored as PNG (copied when they already are single-channel / RGB PNGs).
`--eval` writes benchmark shards (an `eval` block with the split and the condition).

    python -m data_recipes.multigen --input 'MultiGen-20M_depth/data/train-*.parquet' --output data/real/multigen_depth
    python -m data_recipes.multigen --input 'MultiGen-20M_depth_eval/data/*.parquet' --eval \\
        --output data/eval/multigen_depth_eval
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from data_recipes._cli import execute, make_parser, resolve_inputs
from data_recipes._images import encoded_image, image_bytes, image_size, rgb_png, single_channel_png
from data_recipes._rows import RowContext, Sample, Skip, clean_text
from data_recipes._sources import ParquetSource

NAME = "multigen"
EDGE_TYPES = ("canny", "hed", "lineart")


def table_kind(columns: Sequence[str]) -> str:
    if "control_depth" in columns:
        return "depth"
    if "control_seg" in columns:
        return "seg"
    return "edges"


class MultiGenConverter:
    def __init__(self, kind: str, dataset: str, edge_types: Sequence[str] = EDGE_TYPES,
                 eval_split: str | None = None):
        self.kind, self.dataset, self.edge_types, self.eval_split = kind, dataset, list(edge_types), eval_split

    def _map(self, row: dict[str, Any], column: str, size: tuple[int, int], to_png) -> bytes:
        data = image_bytes(row.get(column), column)
        if image_size(data) != size:
            raise Skip(f"{column} size differs from image")
        return to_png(data)

    def __call__(self, row: dict[str, Any], ctx: RowContext) -> Iterator[Sample]:
        prompt = clean_text(row.get("text") if "text" in row else row.get("prompt"))
        if not prompt:
            raise Skip("empty caption")
        data, ext, size = encoded_image(row.get("image"))
        files = {f"image.{ext}": data}
        if self.kind == "depth":
            files["depth.png"] = self._map(row, "control_depth", size, single_channel_png)
            types = ["depth"]
        elif self.kind == "seg":
            files["seg.png"] = self._map(row, "control_seg", size, rgb_png)
            if row.get("seg_map") is not None:
                files["labels.png"] = self._map(row, "seg_map", size, single_channel_png)
            types = ["seg"]
        else:
            types = list(self.edge_types)
        record: dict[str, Any] = {"task": "control", "prompt": prompt, "caption": prompt, "width": size[0],
                                  "height": size[1], "dataset": self.dataset, "control": {"types": types}}
        if self.eval_split is not None:
            record["eval"] = {"benchmark": "multigen20m", "split": self.eval_split, "condition": types[0]
                              if len(types) == 1 else types, "has_target": True}
        yield Sample(ctx.key(), record, files)


def main(argv: Sequence[str] | None = None):
    p = make_parser(NAME, __doc__)
    p.add_argument("--types", nargs="+", choices=EDGE_TYPES, default=list(EDGE_TYPES),
                   help="conditions of an image-only table, computed on the fly by the builders")
    p.add_argument("--dataset", default="multigen20m",
                   help="name written in the records (e.g. captioned_ade20k, captioned_cocostuff)")
    p.add_argument("--eval", action="store_true", help="write benchmark shards")
    p.add_argument("--split", default="eval", help="split name for the eval block")
    args = p.parse_args(argv)
    source = ParquetSource(resolve_inputs(args.input, (".parquet",)))
    convert = MultiGenConverter(table_kind(source.schema_names), args.dataset, args.types,
                                args.split if args.eval else None)
    return execute(args, NAME, source, convert)


if __name__ == "__main__":
    main()
