"""InstructPix2Pix (`timbrooks/instructpix2pix-clip-filtered` parquet) -> instruction-editing shards.

Source `original_image`, target `edited_image`, instruction `edit_prompt`; `edited_prompt` becomes the
caption and `original_prompt` the source caption. The release carries no quality scores.

    python -m data_recipes.instructpix2pix --input 'instructpix2pix-clip-filtered/data/train-*.parquet' \\
        --output data/real/instructpix2pix
"""

from __future__ import annotations

from collections.abc import Sequence

from data_recipes._cli import execute, make_parser, resolve_inputs
from data_recipes._editing import EditColumns, EditingConverter
from data_recipes._sources import ParquetSource

NAME = "instructpix2pix"
COLUMNS = EditColumns(dataset=NAME, source="original_image", target="edited_image", instruction="edit_prompt",
                      caption="edited_prompt", source_caption="original_prompt")


def main(argv: Sequence[str] | None = None):
    args = make_parser(NAME, __doc__).parse_args(argv)
    source = ParquetSource(resolve_inputs(args.input, (".parquet",)))
    return execute(args, NAME, source, EditingConverter(COLUMNS))


if __name__ == "__main__":
    main()
