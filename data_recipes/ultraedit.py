"""UltraEdit (`BleachNick/UltraEdit`, `BleachNick/UltraEdit_Region_Based_100k` parquet) -> editing shards.

Source `source_image`, target `edited_image`, instruction `edit_prompt`, caption `target_caption`; the
region-based split's `mask_image` becomes `mask.png` (the free-form split has a null-typed column). The
similarity scores (`clip_sim_*`, `dinov2_sim`, `ssim`) are kept under `quality`; `--min-score` filters.

    python -m data_recipes.ultraedit --input 'UltraEdit/data/FreeForm-*.parquet' --output data/real/ultraedit
"""

from __future__ import annotations

from collections.abc import Sequence

from data_recipes._cli import execute, make_parser, parse_minimums, resolve_inputs
from data_recipes._editing import EditColumns, EditingConverter, add_score_arguments
from data_recipes._sources import ParquetSource

NAME = "ultraedit"
COLUMNS = EditColumns(dataset=NAME, source="source_image", target="edited_image", instruction="edit_prompt",
                      mask="mask_image", caption="target_caption", source_caption="source_caption",
                      scores=("clip_sim_source", "clip_sim_target", "clip_sim_dir", "clip_sim_image",
                              "dinov2_sim", "ssim"),
                      extra=("idx", "edit_object"))


def main(argv: Sequence[str] | None = None):
    p = make_parser(NAME, __doc__)
    add_score_arguments(p, COLUMNS.scores)
    args = p.parse_args(argv)
    source = ParquetSource(resolve_inputs(args.input, (".parquet",)))
    return execute(args, NAME, source, EditingConverter(COLUMNS, parse_minimums(args.min_score, COLUMNS.scores)))


if __name__ == "__main__":
    main()
