"""Shard lists from config: local paths, brace patterns (`train-{0000..0007}.tar`), globs, directories
(every `*.tar` inside, recursively), lists of those, or `::`-joined strings; remote URLs pass through untouched."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import braceexpand

from cologen.errors import MissingInput

_REMOTE = ("http://", "https://", "s3://", "gs://", "pipe:", "hf://")
# the converters of docs/data.md that write each task's shards (data_recipes.<name>)
RECIPES = {"inpainting": ["inpainting"], "grounding": ["refcoco", "lvis"], "control": ["multigen"],
           "customized": ["subjects200k"], "editing": ["omniedit", "magicbrush", "ultraedit", "instructpix2pix"]}


def how_to_make(pattern: str, what: str) -> str:
    """Which command writes the shards `pattern` names (`what` ends with the task: `data.train_shards.control`)."""
    if "shapeworld" in pattern.lower():
        folder = pattern[:pattern.lower().index("shapeworld") + len("shapeworld")]
        return ("run `make data` (ShapeWorld)" if folder == "data/shapeworld"
                else f"run `python -m data_recipes.shapeworld --out {folder}`")
    recipes = RECIPES.get(what.rsplit(".", 1)[-1])
    if not recipes:
        return "write them with a data_recipes converter (docs/data.md)"
    others = f" (or {', '.join(recipes[1:])})" if recipes[1:] else ""
    return f"convert the data with `python -m data_recipes.{recipes[0]}`{others}, see docs/data.md"


def expand_shards(spec: str | Sequence[str], what: str = "shards") -> list[str]:
    """All shard paths of `spec`, in order; a one-line error naming `what` if a local one is missing."""
    items = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        for part in str(item).split("::"):
            for url in braceexpand.braceexpand(part):
                if url.startswith(_REMOTE):
                    out.append(url)
                elif os.path.isdir(url):
                    found = sorted(glob.glob(os.path.join(url, "**", "*.tar"), recursive=True))
                    if not found:
                        raise MissingInput(f"{what}: directory {url!r} holds no .tar shards: {how_to_make(url, what)}")
                    out.extend(found)
                elif any(c in url for c in "*?["):
                    found = sorted(glob.glob(url))
                    if not found:
                        raise MissingInput(f"{what}: no shards match {url!r}: {how_to_make(url, what)}")
                    out.extend(found)
                elif os.path.isfile(url):
                    out.append(url)
                else:
                    raise MissingInput(f"{what}: no shard at {url!r}: {how_to_make(url, what)}")
    if not out:
        raise ValueError(f"{what}: the shard list is empty")
    return out
