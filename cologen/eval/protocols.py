"""The benchmark protocols by name (`cologen eval PROTOCOL`): how each reads its evaluation shards, what the
model is given, and which scorer scores the output (the paper's Tables 2-4 and GEdit-Bench; method.md,
"Evaluation").

A protocol turns a stored sample (`cologen.data.records.Sample`, from the shards the `data_recipes` commands
write with their eval blocks) into the plain dict its scorer reads, plus the model's request (task, prompt,
condition image). ShapeWorld is scored from the model's own validation probes (`cologen/commands/evaluate.py`).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cologen.data.records import Sample as StoredSample
from cologen.errors import MissingInput

EvalSample = dict[str, Any]


@dataclass(frozen=True)
class Protocol:
    """task: the model's task; to_sample: a stored sample (and its raw members) -> the scorer's sample with
    `prompt` and `condition` (the model's input image); scorer: CLI arguments -> a `Scorer`; weights: the model-path
    arguments it needs (named in docs/metrics.md)."""

    task: str
    to_sample: Callable[[StoredSample, dict[str, Any], argparse.Namespace], EvalSample]
    scorer: Callable[[argparse.Namespace], Any]
    weights: tuple[str, ...]
    table: str


def _dreambench(s: StoredSample, raw: dict[str, Any], args: argparse.Namespace) -> EvalSample:
    info = s.record.get("eval", {})
    return {"key": s.key, "prompt": s.record["prompt"], "reference": s.source, "condition": s.source,
            "clip_prompt": info.get("clip_prompt", s.record["prompt"])}


def _editing(s: StoredSample, raw: dict[str, Any], args: argparse.Namespace) -> EvalSample:
    edit = s.record.get("edit", {})
    out = {"key": s.key, "prompt": s.record["prompt"], "source": s.source, "condition": s.source}
    if s.record.get("caption"):
        out["caption"] = s.record["caption"]
    if edit.get("source_caption"):
        out["source_caption"] = edit["source_caption"]
    if s.record.get("eval", {}).get("has_target", True):
        out["image"] = s.image
    return out


def _multigen(s: StoredSample, raw: dict[str, Any], args: argparse.Namespace) -> EvalSample:
    condition = args.condition
    out: EvalSample = {"key": s.key, "prompt": s.record["prompt"], "image": s.image}
    if condition in ("depth", "seg"):
        stored = s.depth if condition == "depth" else s.seg
        if stored is None:
            raise MissingInput(f"{s.key} has no {condition} map: convert that split with data_recipes.multigen")
        out["condition"] = stored if stored.ndim == 3 else np.repeat(stored[..., None], 3, axis=2)
        if condition == "depth":
            out["depth"] = stored
        else:  # the label ids mIoU compares with (data_recipes.multigen stores them as labels.png)
            if "labels.png" not in raw:
                raise MissingInput(f"{s.key} has no labels.png: mIoU needs the seg_map column of the table")
            out["seg_map"] = cv2.imdecode(np.frombuffer(raw["labels.png"], np.uint8), cv2.IMREAD_UNCHANGED)
        return out
    # edge maps: drawn from the ground truth the way the builders draw them in training
    if condition == "canny":
        from cologen.data.control import canny

        edges = canny(s.image)
    else:
        path = getattr(args, condition)
        if path is None:
            raise MissingInput(f"--{condition} is needed: the {condition} network draws the model's condition")
        edges = _annotator(condition, str(path))(s.image)
    out["condition"] = np.repeat(edges[..., None], 3, axis=2)
    return out


@functools.lru_cache(maxsize=2)
def _annotator(condition: str, path: str):
    from cologen.data.annotators import load_hed, load_lineart

    return (load_hed if condition == "hed" else load_lineart)(path)


def _dreambench_scorer(args):
    from cologen.eval.dreambench import DreamBenchScorer

    return DreamBenchScorer(args.clip, args.dino, args.device)


def _editing_scorer(args):
    from cologen.eval.editing import EditingScorer

    return EditingScorer(args.clip, args.dino, args.device)


def _multigen_scorer(args):
    from cologen.eval.multigen import MultiGenScorer

    return MultiGenScorer(args.condition, clip_path=args.clip, depth_path=args.depth, segmenter_path=args.segmenter,
                          hed_path=args.hed, lineart_path=args.lineart, fid_features=args.fid,
                          resolution=args.resolution, reduce_zero_label=args.reduce_zero_label, device=args.device)


PROTOCOLS: dict[str, Protocol] = {
    "dreambench": Protocol("customized", _dreambench, _dreambench_scorer, ("clip", "dino"), "Table 3"),
    "magicbrush": Protocol("editing", _editing, _editing_scorer, ("clip", "dino"), "Table 4"),
    "emu_edit": Protocol("editing", _editing, _editing_scorer, ("clip", "dino"), "Table 4"),
    "gedit_bench": Protocol("editing", _editing, _editing_scorer, ("clip", "dino"), "GEdit-Bench"),
    "multigen": Protocol("control", _multigen, _multigen_scorer, ("clip", "depth", "segmenter", "hed", "lineart",
                                                                 "fid"), "Table 2"),
}


def eval_shards(folder: str | Path) -> list[Path]:
    shards = sorted(Path(folder).glob("*.tar"))
    if not shards:
        raise MissingInput(f"no shards (*.tar) in {folder}: write them with the benchmark's data_recipes command "
                           "(docs/data.md)")
    return shards


def read_eval_shards(folder: str | Path) -> Iterator[tuple[StoredSample, dict[str, Any]]]:
    """Every sample of the `*.tar` shards in `folder`, decoded and raw (a bad sample is counted, logged and
    skipped, as in training)."""
    from cologen.data.reader import ShardReader
    from cologen.data.records import BadSample, decode_sample
    from cologen.data.skips import SkipCounter

    shards = eval_shards(folder)
    skips = SkipCounter()
    reader = ShardReader(skips)
    for shard in shards:
        for raw in reader.read(str(shard)):
            try:
                sample = decode_sample(raw)
            except BadSample as bad:
                skips(bad)
                continue
            skips.ok()
            yield sample, raw
