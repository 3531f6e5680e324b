"""GEdit-Bench (`stepfun-ai/GEdit-Bench` parquet) -> editing benchmark shards.

`input_image` is the image to edit, stored as `source` and `image` (no ground truth; `eval.has_target`
false); `instruction` is the prompt. `task_type`, `key`, `instruction_language` and `Intersection_exist` are
kept under `edit`. `--language en` keeps the English instructions only (the benchmark has en and cn).

    python -m data_recipes.gedit_bench --input 'GEdit-Bench/data/*.parquet' --output data/eval/gedit_bench --language en
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from data_recipes._cli import execute, make_parser, resolve_inputs
from data_recipes._editing import EditColumns, EditingConverter
from data_recipes._rows import RowContext, Sample, Skip
from data_recipes._sources import ParquetSource

NAME = "gedit_bench"
COLUMNS = EditColumns(dataset=NAME, source="input_image", target=None, instruction="instruction",
                      extra=("task_type", "key", "instruction_language", "Intersection_exist"))
READ = ("task_type", "key", "instruction", "instruction_language", "input_image", "Intersection_exist")


class GEditConverter(EditingConverter):
    def __init__(self, language: str | None, split: str):
        super().__init__(COLUMNS, eval_info={"benchmark": "gedit_bench", "split": split})
        self.language = language

    def __call__(self, row: dict[str, Any], ctx: RowContext) -> Iterator[Sample]:
        if self.language and row.get("instruction_language") != self.language:
            raise Skip("instruction language not selected")
        return super().__call__(row, ctx)


def main(argv: Sequence[str] | None = None):
    p = make_parser(NAME, __doc__)
    p.add_argument("--language", choices=("en", "cn"), default=None, help="default: both")
    p.add_argument("--split", default="test")
    args = p.parse_args(argv)
    source = ParquetSource(resolve_inputs(args.input, (".parquet",)), columns=READ)
    return execute(args, NAME, source, GEditConverter(args.language, args.split))


if __name__ == "__main__":
    main()
