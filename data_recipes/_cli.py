"""The command line every recipe shares: common arguments, input resolution, one-line errors, `execute`.

A recipe's `main()` builds its parser with `make_parser`, adds its own options and calls `execute`.
"""

from __future__ import annotations

import argparse
import glob
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from data_recipes._rows import Convert, RowSource
from data_recipes._writer import Job, Summary, run


def make_parser(name: str, description: str, shard_size: int = 1000) -> argparse.ArgumentParser:
    """The arguments every recipe takes; recipes add their own."""
    p = argparse.ArgumentParser(prog=f"python -m data_recipes.{name}", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="input file(s), folder(s) or glob(s)")
    p.add_argument("--output", required=True, type=Path, help="folder for the shards (created)")
    p.add_argument("--max-samples", type=int, default=None, help="stop after this many samples (a dry run)")
    p.add_argument("--shard-size", type=int, default=shard_size, help="input rows per output shard")
    p.add_argument("--prefix", default=None, help=f"shard file name prefix (default: {name})")
    p.add_argument("--workers", type=int, default=1, help="processes, one shard each at a time")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-row random choices")
    p.add_argument("--strict", action="store_true", help="stop on unexpected errors instead of counting them")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--holdout", choices=("train", "val"), default=None,
                   help="'val': only the held-out rows (a hash of each row's index), e.g. the validation folder of "
                        "a flux_dev run; 'train': only the others (default: every row)")
    p.add_argument("--holdout-fraction", type=float, default=0.01,
                   help="share of the rows held out (default: %(default)s)")
    return p


def resolve_inputs(specs: Sequence[str], suffixes: Sequence[str]) -> list[Path]:
    """Files named, found in named folders (recursively) or matched by globs, ending in one of `suffixes`.

    Folders and globs are expanded in sorted order, so the row order (and so the shard contents) is stable.
    Exits with a one-line error when a path does not exist or nothing matches.
    """
    found: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if any(ch in spec for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True))
            if not matches:
                fail(f"no input matches {spec}")
            found += [m for m in matches if m.is_file()]
        elif path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(tuple(suffixes)))
        elif path.exists():
            found.append(path)
        else:
            fail(f"input path not found: {spec}")
    found = [p for p in found if p.name.endswith(tuple(suffixes))]
    if not found:
        fail(f"no {'/'.join(suffixes)} files in {' '.join(specs)}")
    return found


def require_path(path: str | Path | None, what: str) -> Path:
    if path is None or not Path(path).exists():
        fail(f"{what} not found: {path}")
    return Path(path)


def fail(message: str) -> None:
    """A one-line error for the user, not a traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_minimums(items: Sequence[str] | None, allowed: Sequence[str]) -> dict[str, float]:
    """`NAME=VALUE` pairs of `--min-score` into a dict; a one-line error for unknown names or bad values."""
    out: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        name = name.strip()
        try:
            out[name] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            fail(f"--min-score takes NAME=VALUE, got {item!r}")
        if name not in allowed:
            fail(f"--min-score: no score {name!r}; scores: {', '.join(allowed)}")
    return out


def execute(args: argparse.Namespace, name: str, source: RowSource, convert: Convert) -> Summary:
    """Run a recipe from parsed common arguments, print the summary, and return it."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.shard_size < 1 or args.workers < 1:
        fail("--shard-size and --workers must be >= 1")
    if not 0.0 < args.holdout_fraction < 1.0:
        fail(f"--holdout-fraction must be between 0 and 1, got {args.holdout_fraction}")
    job = Job(source=source, convert=convert, output=args.output, prefix=args.prefix or name,
              shard_size=args.shard_size, max_samples=args.max_samples, seed=args.seed, strict=args.strict,
              holdout=args.holdout, holdout_fraction=args.holdout_fraction)
    summary = run(job, workers=args.workers, progress=not args.quiet, desc=name)
    print(summary.text())
    return summary
