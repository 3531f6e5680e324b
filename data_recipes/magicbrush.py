"""MagicBrush -> instruction-editing shards: the parquet release (`osunlp/MagicBrush`, train and dev) or the
test archive (`test/edit_sessions.json` + `test/images/{img_id}/...`).

Source `source_img`, target `target_img`, instruction `instruction`; `mask_img` (the source with the edited
region painted white) becomes `mask.png`. Multi-turn sessions give one sample per turn (`edit.turn_index`).
The test archive is written as benchmark shards (an `eval` block, caption from `global_descriptions.json`);
`--eval` does the same for a parquet split (e.g. dev).

    python -m data_recipes.magicbrush --input 'MagicBrush/data/train-*.parquet' --output data/real/magicbrush
    python -m data_recipes.magicbrush --input MagicBrush-test/test --output data/eval/magicbrush_test
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_recipes._cli import execute, fail, make_parser, resolve_inputs
from data_recipes._editing import EditColumns, EditingConverter
from data_recipes._sources import ListSource, ParquetSource

NAME = "magicbrush"
COLUMNS = EditColumns(dataset=NAME, source="source_img", target="target_img", instruction="instruction",
                      mask="mask_img", caption="target_caption", extra=("img_id", "turn_index"),
                      mask_painted_on_source=True)


def _file(folder: Path, name: str) -> dict[str, Any]:
    # A path-only image struct: read when the row is converted, so the whole test set is never in memory.
    return {"bytes": None, "path": str((folder / name).resolve())}


def test_rows(test_dir: Path) -> list[dict[str, Any]]:
    """One row per turn of `edit_sessions.json`, sessions in image-id order."""
    sessions = json.loads((test_dir / "edit_sessions.json").read_text())
    desc_path = test_dir / "global_descriptions.json"
    descriptions = json.loads(desc_path.read_text()) if desc_path.exists() else {}
    rows = []
    for img_id in sorted(sessions, key=lambda k: (len(k), k)):
        folder = test_dir / "images" / img_id
        for turn, edit in enumerate(sessions[img_id], start=1):
            rows.append({"img_id": img_id, "turn_index": turn, "instruction": edit.get("instruction"),
                         "source_img": _file(folder, edit["input"]), "target_img": _file(folder, edit["output"]),
                         "mask_img": _file(folder, edit["mask"]) if edit.get("mask") else None,
                         "target_caption": descriptions.get(img_id, {}).get(edit["output"])})
    return rows


def find_test_dir(specs: Sequence[str]) -> Path | None:
    for spec in specs:
        p = Path(spec)
        if p.name == "edit_sessions.json" and p.is_file():
            return p.parent
        if (p / "edit_sessions.json").is_file():
            return p
        if (p / "test" / "edit_sessions.json").is_file():
            return p / "test"
    return None


def main(argv: Sequence[str] | None = None):
    p = make_parser(NAME, __doc__)
    p.add_argument("--eval", action="store_true", help="write benchmark shards (an eval block per record)")
    p.add_argument("--split", default=None, help="split name for the eval block (default: test / dev)")
    args = p.parse_args(argv)
    test_dir = find_test_dir(args.input)
    if test_dir is not None:
        if len(args.input) > 1:
            fail("give the MagicBrush test folder alone")
        source = ListSource(test_rows(test_dir))
        eval_info = {"benchmark": "magicbrush", "split": args.split or "test"}
    else:
        source = ParquetSource(resolve_inputs(args.input, (".parquet",)))
        eval_info = {"benchmark": "magicbrush", "split": args.split or "dev"} if args.eval else None
    return execute(args, NAME, source, EditingConverter(COLUMNS, eval_info=eval_info))


if __name__ == "__main__":
    main()
