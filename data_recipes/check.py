"""Validate shards: per-task counts, every malformed sample with its key and reason, and each shard against its
manifest.

    python -m data_recipes.check data/shapeworld/*/train-*.tar
    python -m data_recipes.check 'data/shapeworld/editing/train-{0000..0007}.tar' --no-build
    python -m data_recipes.check data/real/omniedit --config experiments/flux_dev/data_stage3.yaml

A sample is read as the loader reads it (`ShardReader`: archive errors, repeated keys, a shard shorter than its
manifest; then the record, members, boxes inside the image, images decode) and, unless --no-build, also built for
its task once, in the output frame of the run (`--resolution`, `--aspect-buckets`, `--bucket-multiple`,
`--min-visible`, or all of them from a data config with `--config`), so a missing depth map, an empty grounding
block or a referent the frame crops away shows here rather than as a skip counter in training. A shard with a
manifest is also checked for samples missing from it or not in it, its byte size and its sha256.

Exit status 1 if anything is malformed. Refusals of the frame (`crop`) are listed and counted but do not fail the
check: they depend on the frame, not on the data.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cologen.data.builders import BuilderConfig, TaskBuilder
from cologen.data.geometry import make_buckets
from cologen.data.manifest import describe, file_sha256, write_manifest
from cologen.data.reader import ShardReader
from cologen.data.records import BadSample, decode_sample
from cologen.data.shards import expand_shards
from cologen.data.skips import categorize
from cologen.data.tasks import TASKS

REFUSALS = ("crop",)  # categories that say "not in this frame", not "broken"


@dataclass
class Report:
    counts: Counter = field(default_factory=Counter)  # good samples per task
    bad: list[tuple[str, str, str, str]] = field(default_factory=list)  # (url, key or place, category, reason)
    refused: list[tuple[str, str, str, str]] = field(default_factory=list)  # the same, for refusals of the frame
    shards: int = 0
    unindexed: list[str] = field(default_factory=list)  # shards without a manifest
    manifests_written: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad

    def add(self, url: str, key: str, category: str, reason: str) -> None:
        (self.refused if category in REFUSALS else self.bad).append((url, key, category, reason))


def _compare_with_manifest(url: str, reader: ShardReader, report: Report, truncated: bool) -> None:
    read = reader.last
    m = read.manifest
    listed, seen = set(m.keys), set(read.keys)
    extra = [k for k in read.keys if k not in listed]
    if extra:
        report.add(url, "(manifest)", "manifest", f"{len(extra)} samples not in the manifest: {', '.join(extra[:3])}"
                   + (" ..." if len(extra) > 3 else ""))
    missing = [k for k in m.keys if k not in seen]
    if missing and not truncated:  # a short shard already named what it misses
        report.add(url, "(manifest)", "manifest", f"{len(missing)} samples of the manifest are missing: "
                   f"{', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
    if truncated:
        return
    size = os.path.getsize(url)
    if size != m.filesize:
        report.add(url, "(manifest)", "manifest", f"the shard has {size} bytes, its manifest says {m.filesize}")
    elif file_sha256(url) != m.sha256:
        report.add(url, "(manifest)", "manifest", "the shard's sha256 differs from its manifest's")


def check_shard(url: str, report: Report, builder: TaskBuilder | None, rng: np.random.Generator,
                write_manifests: bool = False) -> None:
    problems: list[BadSample] = []
    reader = ShardReader(problems.append)
    report.shards += 1
    for raw in reader.read(url):
        key = str(raw.get("__key__", "?"))
        try:
            sample = decode_sample(raw)
            if builder is not None:
                builder(sample, sample.task, rng)
        except Exception as e:  # noqa: BLE001 - a failure of this sample is what we report
            category, reason = (e.category, e.reason) if isinstance(e, BadSample) else categorize(e)
            report.add(url, key, category, reason)
            continue
        report.counts[sample.task] += 1
    for p in problems:  # the reader's: archive errors, duplicates, a short shard
        report.add(url, p.key, p.category, p.reason)
    read = reader.last
    if read.manifest is not None:
        _compare_with_manifest(url, reader, report, truncated=any(p.category == "truncated" for p in problems))
    elif os.path.isfile(url):
        report.unindexed.append(url)
        if write_manifests and not problems and read.keys:
            write_manifest(url, describe(url, read.keys))
            report.manifests_written.append(url)


def check(urls: Sequence[str], build: bool = True, builder: TaskBuilder | None = None,
          write_manifests: bool = False) -> Report:
    """Check every shard; `builder` sets the output frame and builder options (default: the tiny preset's)."""
    report = Report()
    if build and builder is None:
        builder = TaskBuilder(stratified=False)
    rng = np.random.default_rng(0)
    for url in urls:
        check_shard(url, report, builder if build else None, rng, write_manifests)
    return report


def frame_from_config(path: str) -> dict[str, Any]:
    """`resolution`, `aspect_buckets`, `bucket_multiple` and `builder` of a data config (`data.init_args`)."""
    config = yaml.safe_load(Path(path).read_text()) or {}
    args = (config.get("data") or {}).get("init_args") or {}
    return {k: args[k] for k in ("resolution", "aspect_buckets", "bucket_multiple", "builder") if k in args}


def make_builder(resolution: int = 32, aspect_buckets: bool = False, bucket_multiple: int = 16,
                 builder: dict[str, Any] | None = None) -> TaskBuilder:
    buckets = make_buckets(resolution, bucket_multiple) if aspect_buckets else None
    return TaskBuilder(BuilderConfig(**(builder or {})), resolution, buckets, stratified=False)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_recipes.check", description=__doc__.split("\n\n")[0])
    ap.add_argument("shards", nargs="+", help="shard paths, brace patterns, globs or directories")
    ap.add_argument("--no-build", action="store_true", help="skip building each sample for its task")
    ap.add_argument("--config", help="a data config (YAML with data.init_args): build in its frame and options")
    ap.add_argument("--resolution", type=int, help="output side, or bucket area with --aspect-buckets (default 32)")
    ap.add_argument("--aspect-buckets", action="store_true", default=None, help="as data.aspect_buckets")
    ap.add_argument("--bucket-multiple", type=int, help="as data.bucket_multiple (default 16)")
    ap.add_argument("--min-visible", type=float, help="as builder.min_visible (default 0.5)")
    ap.add_argument("--write-manifests", action="store_true",
                    help="write a manifest for each shard without one that reads cleanly")
    ap.add_argument("--max-listed", type=int, default=200, help="list at most this many problems")
    args = ap.parse_args(argv)
    try:
        urls = expand_shards(args.shards, "shards")
        frame = frame_from_config(args.config) if args.config else {}
        for name in ("resolution", "aspect_buckets", "bucket_multiple"):
            if getattr(args, name) is not None:
                frame[name] = getattr(args, name)
        if args.min_visible is not None:
            frame["builder"] = {**(frame.get("builder") or {}), "min_visible": args.min_visible}
        builder = make_builder(**frame)
    except (OSError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = check(urls, build=not args.no_build, builder=builder, write_manifests=args.write_manifests)
    listed = [("BAD", *b) for b in report.bad] + [("SKIP", *r) for r in report.refused]
    for tag, url, key, category, reason in listed[: args.max_listed]:
        print(f"{tag} {url} {key} [{category}] {reason}")
    if len(listed) > args.max_listed:
        print(f"... and {len(listed) - args.max_listed} more")
    if not args.no_build:
        buckets = f"aspect buckets of ~{builder.resolution}^2 px" if builder.buckets else \
            f"{builder.resolution}x{builder.resolution} square"
        print(f"built in the frame: {buckets}, min_visible {builder.cfg.min_visible:g}")
    print(f"{'task':<12} {'samples':>8}")
    for task in TASKS:
        if report.counts[task]:
            print(f"{task:<12} {report.counts[task]:>8}")
    by_cat = Counter(c for _, _, c, _ in report.bad + report.refused)
    print(f"{report.shards} shards, {sum(report.counts.values())} good samples, {len(report.bad)} malformed, "
          f"{len(report.refused)} refused in this frame"
          + (f" ({', '.join(f'{k} {v}' for k, v in sorted(by_cat.items()))})" if by_cat else ""))
    if report.unindexed:
        print(f"{len(report.unindexed)} shards have no manifest (a truncated one reads as a shorter one)"
              + (f"; wrote {len(report.manifests_written)}" if args.write_manifests else
                 "; --write-manifests adds them for shards that read cleanly"))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
