"""Emu Edit test set (`facebook/emu_edit_test_set` parquet) -> editing benchmark shards.

The set has no ground-truth edits: `image` is the image to edit and is stored as both `source` and `image`
(`eval.has_target` false). `output_caption` is the caption (CLIP-T's text), `input_caption` the source
caption; `task`, `idx`, `hash` and the split are kept in the `eval` block.

    python -m data_recipes.emu_edit --input emu_edit_test_set/data/test-*.parquet --output data/eval/emu_edit_test
"""

from __future__ import annotations

from collections.abc import Sequence

from data_recipes._cli import execute, make_parser, resolve_inputs
from data_recipes._editing import EditColumns, EditingConverter
from data_recipes._sources import ParquetSource

NAME = "emu_edit"
COLUMNS = EditColumns(dataset=NAME, source="image", target=None, instruction="instruction",
                      caption="output_caption", source_caption="input_caption",
                      extra=("task", "split", "idx", "hash"))


def main(argv: Sequence[str] | None = None):
    p = make_parser(NAME, __doc__)
    p.add_argument("--split", default="test", help="split name for the eval block")
    args = p.parse_args(argv)
    source = ParquetSource(resolve_inputs(args.input, (".parquet",)))
    convert = EditingConverter(COLUMNS, eval_info={"benchmark": "emu_edit", "split": args.split})
    return execute(args, NAME, source, convert)


if __name__ == "__main__":
    main()
