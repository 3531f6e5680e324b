"""Validate shards: per-task counts, and every malformed sample with its key and reason.

    python -m data_recipes.check data/shapeworld/*/train-*.tar
    python -m data_recipes.check 'data/shapeworld/editing/train-{0000..0007}.tar' --no-build

A sample is checked as the loader reads it (record, members, boxes inside the image, images decode) and,
unless --no-build, also built for its task once, so a missing depth map or an empty grounding block shows
here rather than as a skip counter in training. Exit status 1 if anything is malformed.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import webdataset as wds

from cologen.data.builders import TaskBuilder
from cologen.data.records import BadSample, decode_sample
from cologen.data.shards import expand_shards
from cologen.data.skips import categorize
from cologen.data.tasks import TASKS


@dataclass
class Report:
    counts: Counter = field(default_factory=Counter)  # good samples per task
    bad: list[tuple[str, str, str, str]] = field(default_factory=list)  # (url, key, category, reason)
    shards: int = 0

    @property
    def ok(self) -> bool:
        return not self.bad


def check_shard(url: str, report: Report, builder: TaskBuilder | None, rng: np.random.Generator) -> None:
    last_key = ["(start of shard)"]

    def on_error(exn: BaseException) -> bool:  # archive-level problems: no sample key of their own
        category, reason = categorize(exn)
        where = f"after {last_key[0]}"
        if not any(u == url and w == where and c == category for u, w, c, _ in report.bad):  # once per place
            report.bad.append((url, where, category, reason.split(" @ ")[0].split(" <")[0]))
        return True

    report.shards += 1
    for raw in wds.tarfile_samples([{"url": url}], handler=on_error):
        key = str(raw.get("__key__", "?"))
        last_key[0] = key
        try:
            sample = decode_sample(raw)
            if builder is not None:
                builder(sample, sample.task, rng)
        except BadSample as e:
            report.bad.append((url, key, e.category, e.reason))
            continue
        except Exception as e:  # noqa: BLE001 - a builder failure on this sample is what we report
            category, reason = categorize(e)
            report.bad.append((url, key, category, reason))
            continue
        report.counts[sample.task] += 1


def check(urls: Sequence[str], build: bool = True) -> Report:
    report = Report()
    builder = TaskBuilder(stratified=False) if build else None
    rng = np.random.default_rng(0)
    for url in urls:
        check_shard(url, report, builder, rng)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_recipes.check", description=__doc__.split("\n\n")[0])
    ap.add_argument("shards", nargs="+", help="shard paths, brace patterns, globs or directories")
    ap.add_argument("--no-build", action="store_true", help="skip building each sample for its task")
    ap.add_argument("--max-listed", type=int, default=200, help="list at most this many malformed samples")
    args = ap.parse_args(argv)
    try:
        urls = expand_shards(args.shards, "shards")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = check(urls, build=not args.no_build)
    for url, key, category, reason in report.bad[: args.max_listed]:
        print(f"BAD {url} {key} [{category}] {reason}")
    if len(report.bad) > args.max_listed:
        print(f"... and {len(report.bad) - args.max_listed} more")
    print(f"{'task':<12} {'samples':>8}")
    for task in TASKS:
        if report.counts[task]:
            print(f"{task:<12} {report.counts[task]:>8}")
    by_cat = Counter(c for _, _, c, _ in report.bad)
    print(f"{report.shards} shards, {sum(report.counts.values())} good samples, {len(report.bad)} malformed"
          + (f" ({', '.join(f'{k} {v}' for k, v in sorted(by_cat.items()))})" if by_cat else ""))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
