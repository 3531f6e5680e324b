"""DreamBench (the `dataset/` folder of the DreamBooth repository) -> customized-generation benchmark shards.

30 subject folders of JPEGs and `prompts_and_classes.txt` (the subject -> class table and two prompt lists,
one for objects and one for live subjects, i.e. cats and dogs): 25 prompts x 30 subjects = 750 samples.
The reference (the `--reference-index`-th image of the subject, sorted by name) is stored as `source` and,
since there is no ground truth, as `image` too (`eval.has_target` false). The prompt is the template filled
with `--unique-token` (empty by default: "a backpack in the jungle") and the class noun; `eval.clip_prompt`
is the text CLIP-T compares to (the template with the class noun only).

    python -m data_recipes.dreambench --input dreambooth/dataset --output data/eval/dreambench
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from data_recipes._cli import execute, fail, make_parser, require_path
from data_recipes._images import encoded_image
from data_recipes._rows import RowContext, Sample, Skip, clean_text
from data_recipes._sources import ListSource

NAME = "dreambench"
LIVE_CLASSES = ("cat", "dog")
_TEMPLATE = re.compile(r"""['"](.*?)['"]\s*\.format\(""")


def parse_prompts_and_classes(text: str) -> tuple[dict[str, str], list[str], list[str]]:
    """(subject -> class, object prompt templates, live-subject prompt templates)."""
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        low = line.lower()
        if low.startswith("subject_name,"):
            section = "classes"
        elif low.startswith("object prompts"):
            section = "object"
        elif low.startswith("live subject prompts"):
            section = "live"
        elif low == "prompts":
            section = None
        elif section == "classes" and "," in line:
            subject, cls = line.split(",", 1)
            classes[subject.strip()] = cls.strip()
        elif section in lists and (m := _TEMPLATE.search(line)):
            lists[section].append(m.group(1))
    return classes, lists["object"], lists["live"]


def fill(template: str, unique_token: str, cls: str) -> str:
    return clean_text(template.format(unique_token, cls))


def rows(dataset: Path, reference_index: int = 0) -> list[dict[str, Any]]:
    classes, object_prompts, live_prompts = parse_prompts_and_classes(
        (dataset / "prompts_and_classes.txt").read_text())
    if not classes or not object_prompts:
        fail(f"no classes or prompts found in {dataset / 'prompts_and_classes.txt'}")
    out = []
    for subject in sorted(classes):
        cls = classes[subject]
        live = cls in LIVE_CLASSES
        images = sorted(p for p in (dataset / subject).glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        reference = images[reference_index] if len(images) > reference_index else None
        for j, template in enumerate(live_prompts if live else object_prompts):
            out.append({"subject": subject, "class": cls, "live": live, "template": template, "prompt_index": j,
                        "reference": {"bytes": None, "path": str(reference.resolve())} if reference else None,
                        "reference_name": reference.name if reference else None})
    return out


class DreamBenchConverter:
    def __init__(self, unique_token: str = ""):
        self.unique_token = unique_token

    def __call__(self, row: dict[str, Any], ctx: RowContext) -> Iterator[Sample]:
        if row["reference"] is None:
            raise Skip("subject folder has no reference image")
        data, ext, (width, height) = encoded_image(row["reference"], "reference image")
        prompt = fill(row["template"], self.unique_token, row["class"])
        record = {"task": "customized", "prompt": prompt, "width": width, "height": height, "dataset": NAME,
                  "subject": {"id": row["subject"], "class": row["class"], "live": row["live"],
                              "reference": row["reference_name"]},
                  "eval": {"benchmark": NAME, "split": "test", "has_target": False,
                           "prompt_index": row["prompt_index"], "template": row["template"],
                           "clip_prompt": fill(row["template"], "", row["class"])}}
        yield Sample(ctx.key(), record, {f"image.{ext}": data, f"source.{ext}": data})


def main(argv: Sequence[str] | None = None):
    p = make_parser(NAME, __doc__)
    p.add_argument("--unique-token", default="", help='identifier in the prompts, e.g. "sks" (default none)')
    p.add_argument("--reference-index", type=int, default=0, help="which image of a subject is the reference")
    args = p.parse_args(argv)
    if len(args.input) != 1:
        fail("give the DreamBench dataset folder")
    dataset = require_path(args.input[0], "input path")
    if not (dataset / "prompts_and_classes.txt").is_file():
        fail(f"no prompts_and_classes.txt in {dataset}")
    return execute(args, NAME, ListSource(rows(dataset, args.reference_index)), DreamBenchConverter(args.unique_token))


if __name__ == "__main__":
    main()
