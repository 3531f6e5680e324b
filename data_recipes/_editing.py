"""One converter for every instruction-editing table: (source, target, instruction[, mask]) -> an editing sample.

The recipes (`omniedit`, `magicbrush`, `ultraedit`, `instructpix2pix`, and the benchmarks `emu_edit`,
`gedit_bench`) only name their columns. Image bytes are copied through; a mask is reduced to a 0/255 PNG.
A benchmark without target images stores the source as `image` and says `"has_target": false`.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from data_recipes._images import encoded_image, image_bytes, white_region_mask
from data_recipes._rows import RowContext, Sample, Skip, check_thresholds, clean_text, numeric_fields

OMNIEDIT_OPERATIONS = {"object_addition": "add", "object_removal": "remove"}


@dataclass(frozen=True)
class EditColumns:
    dataset: str
    source: str
    target: str | None  # None: a benchmark without ground-truth edits
    instruction: str  # a string column, or a list column (one phrasing is drawn per row)
    mask: str | None = None
    caption: str | None = None  # describes the target image
    source_caption: str | None = None
    scores: tuple[str, ...] = ()  # published quality scores, kept under "quality"
    extra: tuple[str, ...] = ()  # other columns kept under "edit" (task, ids, turn index)
    operation_column: str | None = None  # column whose value maps to edit.operation
    mask_painted_on_source: bool = False  # the mask image is the source with the region painted white


def pick_instruction(value: Any, ctx: RowContext) -> tuple[str, list[str]]:
    """(the instruction, all phrasings). A list gives a random non-empty phrasing; Skip when none."""
    if isinstance(value, (list, tuple)):
        phrasings = [t for t in (clean_text(v) for v in value) if t]
        if not phrasings:
            raise Skip("empty instruction list")
        return ctx.rng.choice(phrasings), phrasings
    text = clean_text(value)
    if not text:
        raise Skip("empty instruction")
    return text, [text]


class EditingConverter:
    def __init__(self, cols: EditColumns, minimums: dict[str, float] | None = None,
                 eval_info: dict[str, Any] | None = None):
        self.cols = cols
        self.minimums = minimums or {}
        unknown = set(self.minimums) - set(cols.scores)
        if unknown:
            raise ValueError(f"no such score column(s) for {cols.dataset}: {sorted(unknown)}; "
                             f"known: {list(cols.scores)}")
        self.eval_info = eval_info  # set for benchmark shards: {"benchmark": ..., "split": ...}

    def __call__(self, row: dict[str, Any], ctx: RowContext) -> Iterator[Sample]:
        c = self.cols
        instruction, phrasings = pick_instruction(row.get(c.instruction), ctx)
        scores = numeric_fields(row, c.scores)
        check_thresholds(scores, self.minimums)
        src, s_ext, s_size = encoded_image(row.get(c.source), "source image")
        if c.target is not None:
            tgt, t_ext, t_size = encoded_image(row.get(c.target), "target image")
            if t_size != s_size:
                raise Skip("source and target sizes differ")
        else:
            tgt, t_ext, t_size = src, s_ext, s_size
        files = {f"image.{t_ext}": tgt, f"source.{s_ext}": src}
        if c.mask and row.get(c.mask) is not None:
            try:
                painted = c.mask_painted_on_source
                files["mask.png"] = white_region_mask(image_bytes(row[c.mask], "mask"), t_size,
                                                      painted_on=src if painted else None,
                                                      edited=tgt if painted and c.target is not None else None)
            except Skip as s:  # the edit is still good without its mask
                ctx.skip(f"mask dropped: {s.reason}")
        edit: dict[str, Any] = {"operation": "other", "instruction": instruction}
        if len(phrasings) > 1:
            edit["instructions"] = phrasings
        if c.operation_column:
            edit["operation"] = OMNIEDIT_OPERATIONS.get(str(row.get(c.operation_column)), "other")
        for name in c.extra:
            if name in row:
                edit[name] = row[name]
        if c.source_caption and row.get(c.source_caption):
            edit["source_caption"] = clean_text(row[c.source_caption])
        record: dict[str, Any] = {"task": "editing", "prompt": instruction, "width": t_size[0],
                                  "height": t_size[1], "dataset": c.dataset, "edit": edit}
        if c.caption and row.get(c.caption):
            record["caption"] = clean_text(row[c.caption])
        if scores:
            record["quality"] = scores
        if self.eval_info is not None:
            record["eval"] = dict(self.eval_info) | {"has_target": c.target is not None}
        yield Sample(ctx.key(), record, files)


def add_score_arguments(p: argparse.ArgumentParser, scores: Sequence[str]) -> None:
    p.add_argument("--min-score", action="append", metavar="NAME=VALUE",
                   help=f"keep rows whose score NAME is >= VALUE (repeatable); scores: {', '.join(scores)}")
