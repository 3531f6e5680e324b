"""OmniEdit (`TIGER-Lab/OmniEdit-Filtered-1.2M` parquet) -> instruction-editing shards.

Source `src_img`, target `edited_img`, instruction: one phrasing of `edited_prompt_list` drawn per row (all
phrasings kept under `edit.instructions`). The scores `sc_score_1`, `sc_score_2`, `pq_score`, `o_score` are
kept under `quality`; `--min-score o_score=8` and the like filter on them.

    python -m data_recipes.omniedit --input 'OmniEdit-Filtered-1.2M/data/train-*.parquet' --output data/real/omniedit
"""

from __future__ import annotations

from collections.abc import Sequence

from data_recipes._cli import execute, make_parser, parse_minimums, resolve_inputs
from data_recipes._editing import EditColumns, EditingConverter, add_score_arguments
from data_recipes._sources import ParquetSource

NAME = "omniedit"
COLUMNS = EditColumns(dataset=NAME, source="src_img", target="edited_img", instruction="edited_prompt_list",
                      scores=("sc_score_1", "sc_score_2", "pq_score", "o_score"),
                      extra=("omni_edit_id", "task"), operation_column="task")
READ = ("omni_edit_id", "task", "src_img", "edited_img", "edited_prompt_list", "sc_score_1", "sc_score_2",
        "pq_score", "o_score")  # the reasoning texts are not read


def main(argv: Sequence[str] | None = None):
    p = make_parser(NAME, __doc__)
    add_score_arguments(p, COLUMNS.scores)
    args = p.parse_args(argv)
    source = ParquetSource(resolve_inputs(args.input, (".parquet",)), columns=READ)
    convert = EditingConverter(COLUMNS, parse_minimums(args.min_score, COLUMNS.scores))
    return execute(args, NAME, source, convert)


if __name__ == "__main__":
    main()
