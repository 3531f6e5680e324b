"""The core every converter shares: samples, skip accounting, resumable shard writing, the command line.

A recipe is two things: a row source (`data_recipes._sources`) and a function `convert(row, ctx) -> samples`.
`run()` does the rest:

* Input rows are assigned to output shards deterministically: shard `i` holds the samples of input rows
  `[i * shard_size, (i + 1) * shard_size)`. So `--shard-size` counts *input rows*, and a re-run knows which rows
  each finished shard covers without reading it.
* A shard is written to `NAME.tar.tmp` and renamed when complete; then `_progress/NAME.json` records its counts.
  A re-run skips every shard whose progress file says complete, so an interrupted conversion resumes.
* A row that cannot be converted raises `Skip(reason)`; a sample dropped from a row calls `ctx.skip(reason)`.
  Both are counted by reason and reported, never fatal. Unexpected exceptions are counted as
  `error: TypeName` (re-raised with `--strict`).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import logging
import multiprocessing
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from cologen.data.manifest import ShardWriter

log = logging.getLogger("data_recipes")

PROGRESS_DIR = "_progress"
SUMMARY_FILE = "summary.json"


class Skip(Exception):
    """Raised by a converter for a row that cannot become a sample; the message is the counted reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Sample:
    """One output sample: tar members `{key}.json` plus `{key}.{name}` for every entry of `files`."""

    key: str
    record: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)  # e.g. {"image.jpg": b"...", "mask.png": b"..."}

    def members(self) -> list[tuple[str, bytes]]:
        """(field, bytes) pairs: the record first, then the files in name order."""
        if "." in self.key or "/" in self.key:
            raise ValueError(f"sample keys must not contain dots or slashes: {self.key!r}")
        record = json.dumps(self.record, ensure_ascii=False).encode("utf-8")
        return [("json", record)] + sorted(self.files.items())


class RowSource(Protocol):
    """Rows of a public release in a fixed order. `num_rows` is None when unknown without reading everything."""

    def num_rows(self) -> int | None: ...

    def iter_rows(self, start: int = 0, stop: int | None = None) -> Iterable[tuple[int, dict[str, Any]]]: ...


class RowContext:
    """What a converter gets besides the row: its index, a per-row RNG, sample keys and the sub-row skip counter."""

    def __init__(self, index: int, seed: int, skipped: Counter):
        self.index = index
        # Seeded from (seed, index), so a re-run of one shard picks the same random phrasings.
        self.rng = random.Random(seed * 1_000_003 + index)
        self._skipped = skipped

    def key(self, part: int | str | None = None) -> str:
        return f"{self.index:09d}" if part is None else f"{self.index:09d}_{part}"

    def skip(self, reason: str) -> None:
        """Count a sample dropped from a row whose other samples are kept."""
        self._skipped[reason] += 1


Convert = Callable[[dict[str, Any], RowContext], Iterable[Sample]]


# ---------------------------------------------------------------------------------------------- image helpers

_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"))


def sniff_ext(data: bytes) -> str:
    """The file extension for encoded image bytes, from their magic number (file names in releases lie)."""
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise Skip("unsupported image format")


def image_bytes(value: Any, what: str = "image") -> bytes:
    """Bytes of a parquet image struct `{bytes, path}` (or raw bytes); Skip when missing.

    A struct without bytes whose `path` is an absolute path to a file is read from disk: that is how
    the folder-based releases (MagicBrush test, DreamBench) are fed through the same converters.
    """
    if isinstance(value, dict):
        path = value.get("path")
        value = value.get("bytes")
        if not value and path and os.path.isabs(path) and os.path.isfile(path):
            with open(path, "rb") as f:
                value = f.read()
    if not value:
        raise Skip(f"missing {what} bytes")
    return bytes(value)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header alone; Skip when it cannot be parsed."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception as e:  # PIL raises several types for broken headers
        raise Skip("unreadable image") from e


def encoded_image(value: Any, what: str = "image") -> tuple[bytes, str, tuple[int, int]]:
    """(bytes, extension, (width, height)) of an image column value, copied through untouched."""
    data = image_bytes(value, what)
    return data, sniff_ext(data), image_size(data)


def decode_image(data: bytes, mode: str = "RGB") -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as e:
        raise Skip("unreadable image") from e
    return im.convert(mode) if im.mode != mode else im


def encode_png(im: Image.Image | np.ndarray) -> bytes:
    if isinstance(im, np.ndarray):
        im = Image.fromarray(im)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)  # fast; these are masks and maps, they compress well anyway
    return buf.getvalue()


def encode_jpeg(im: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 chroma: no colour bleeding at object edges, which the grounding/editing targets care about.
    im.convert("RGB").save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def single_channel_png(data: bytes) -> bytes:
    """A map as a single-channel PNG: copied when it already is one, else converted (RGB maps are grey anyway)."""
    if data.startswith(b"\x89PNG"):
        with Image.open(io.BytesIO(data)) as im:
            if im.mode in ("L", "I;16", "I"):
                return data
    return encode_png(decode_image(data, "L"))


def rgb_png(data: bytes) -> bytes:
    """A colour map as an RGB PNG: copied when it already is one (a JPEG colour map would blur class colours)."""
    if data.startswith(b"\x89PNG"):
        with Image.open(io.BytesIO(data)) as im:
            if im.mode == "RGB":
                return data
    return encode_png(decode_image(data, "RGB"))


def white_region_mask(data: bytes, size: tuple[int, int] | None = None, threshold: int = 250,
                      painted_on: bytes | None = None, edited: bytes | None = None, edit_tolerance: int = 16) -> bytes:
    """A region painted white (all channels >= threshold) as a 0/255 single-channel PNG, for both encodings:

    * white on black (UltraEdit's region masks, and any binary mask): every white pixel, whatever the source;
    * painted on the source (MagicBrush's `mask_img`: the source with the edited region painted white; give the
      source as `painted_on`): the white pixels that differ from the source, and those where the source was
      already white (sky, a wall) but the edit changed it (give the target as `edited`). A source pixel that was
      white and that the edit left as it was is the one case the two images cannot tell apart: it counts as
      outside. A copy that differs from the source almost everywhere (re-encoded) is read by white alone.

    Transparent pixels are not part of a painted region. Skip when the size disagrees or the mask is empty.
    """
    im = decode_image(data, "RGBA")
    if size is not None and im.size != tuple(size):
        raise Skip("mask size differs from image")
    arr = np.asarray(im)
    rgb = arr[..., :3]
    white = (rgb.min(axis=-1) >= threshold) & (arr[..., 3] > 0)
    black = rgb.max(axis=-1) <= 255 - threshold
    region = white
    # a binary mask is white on black whatever the source holds (anti-aliased edges aside)
    if painted_on is not None and (white | black).mean() < 0.995:
        src = np.asarray(decode_image(painted_on, "RGB"))
        if src.shape == rgb.shape:
            differs = (src != rgb).any(axis=-1)
            if differs.mean() < 0.99:  # a painted copy, not a re-encoded one
                region = white & differs
                tgt = np.asarray(decode_image(edited, "RGB")) if edited is not None else None
                if tgt is not None and tgt.shape == src.shape:
                    changed = np.abs(tgt.astype(np.int16) - src.astype(np.int16)).max(axis=-1) > edit_tolerance
                    region |= white & ~differs & changed
    if not region.any():
        raise Skip("empty mask")
    return encode_png((region * 255).astype(np.uint8))


def clean_text(value: Any) -> str:
    return " ".join(str(value).split()) if value is not None else ""


def numeric_fields(row: dict[str, Any], names: Sequence[str]) -> dict[str, float | int | None]:
    """Published scores kept as they are (int stays int); absent columns are left out."""
    return {n: row[n] for n in names if n in row}


def check_thresholds(scores: dict[str, Any], minimums: dict[str, float]) -> None:
    """Skip unless every thresholded score exists and is >= its minimum."""
    for name, minimum in minimums.items():
        value = scores.get(name)
        if value is None:
            raise Skip(f"missing score {name}")
        if value < minimum:
            raise Skip(f"{name} < {minimum:g}")


# ---------------------------------------------------------------------------------------------- the runner

@dataclass
class ShardStats:
    shard: str
    rows: tuple[int, int]  # [start, stop) of input rows the shard covers (stop = rows actually read)
    rows_read: int = 0
    rows_skipped: int = 0
    samples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count (rows and samples dropped)
    complete: bool = True
    seconds: float = 0.0


@dataclass
class Summary:
    output: str
    shards_written: int = 0
    shards_resumed: int = 0
    rows_read: int = 0
    rows_skipped: int = 0
    samples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    rows_this_run: int = 0  # rows converted now, not counted from resumed shards

    @property
    def rows_per_second(self) -> float:
        return self.rows_this_run / self.seconds if self.seconds > 0 else 0.0

    def add(self, st: ShardStats, resumed: bool) -> None:
        if resumed:
            self.shards_resumed += 1
        else:
            self.shards_written += 1
            self.rows_this_run += st.rows_read
        self.rows_read += st.rows_read
        self.rows_skipped += st.rows_skipped
        self.samples += st.samples
        c = Counter(self.skipped)
        c.update(st.skipped)
        self.skipped = dict(c.most_common())

    def text(self) -> str:
        lines = [
            f"output: {self.output}",
            f"shards: {self.shards_written} written, {self.shards_resumed} already complete (skipped)",
            f"rows read: {self.rows_read}  (this run: {self.rows_this_run} at {self.rows_per_second:.1f} rows/s)",
            f"samples written: {self.samples}",
            f"rows skipped: {self.rows_skipped}",
        ]
        if self.skipped:
            lines.append("skipped, by reason (whole rows, samples of a kept row, or parts such as a mask):")
            lines += [f"  {n:>8}  {r}" for r, n in self.skipped.items()]
        return "\n".join(lines)


@dataclass
class Job:
    source: RowSource
    convert: Convert
    output: Path
    prefix: str = "shard"
    shard_size: int = 1000
    max_samples: int | None = None
    seed: int = 0
    strict: bool = False

    def shard_name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}"

    def progress_path(self, index: int) -> Path:
        return self.output / PROGRESS_DIR / f"{self.shard_name(index)}.json"

    def finished(self, index: int) -> ShardStats | None:
        path = self.progress_path(index)
        if not path.exists():
            return None
        try:
            st = ShardStats(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            return None  # a corrupt progress file means: redo the shard
        st.rows = tuple(st.rows)
        tar = self.output / f"{st.shard}.tar"
        # A complete shard with samples must still have its tar (a user may have deleted it to redo it).
        if not st.complete or (st.samples and not tar.exists()):
            return None
        return st


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class _ShardWriter:
    """One output shard (`ShardWriter`: a temp name renamed when complete, the manifest beside it, fixed member
    metadata, so re-converting the same rows gives byte-identical shards) plus its conversion counts."""

    def __init__(self, job: Job, index: int):
        self.job = job
        self.index = index
        self.sink = ShardWriter(job.output / f"{job.shard_name(index)}.tar")
        start = index * job.shard_size
        self.stats = ShardStats(shard=job.shard_name(index), rows=(start, start))
        self.counter: Counter = Counter()
        self.t0 = time.perf_counter()

    def write(self, sample: Sample) -> None:
        self.sink.write(sample.key, sample.members())
        self.stats.samples += 1

    def close(self, complete: bool) -> ShardStats:
        self.sink.close()  # an empty shard is not kept
        self.stats.skipped = dict(self.counter.most_common())
        self.stats.complete = complete
        self.stats.seconds = round(time.perf_counter() - self.t0, 3)
        _write_atomic(self.job.progress_path(self.index), json.dumps(asdict(self.stats)))
        return self.stats


def _convert_row(job: Job, index: int, row: dict[str, Any], counter: Counter) -> tuple[list[Sample], bool]:
    """(samples, row_was_skipped)."""
    ctx = RowContext(index, job.seed, counter)
    try:
        return list(job.convert(row, ctx)), False
    except Skip as s:
        counter[s.reason] += 1
        return [], True
    except Exception as e:
        if job.strict:
            raise
        reason = f"error: {type(e).__name__}"
        if counter[reason] == 0:
            log.warning("row %d: %s: %s (counted, conversion goes on; --strict to stop)", index, reason, e)
        counter[reason] += 1
        return [], True


def _write_shard(job: Job, index: int, rows: Iterable[tuple[int, dict[str, Any]]], budget: int | None,
                 on_row: Callable[[int], None] | None = None) -> ShardStats:
    """Convert the given rows of shard `index`, all of them unless `budget` samples run out first."""
    w = _ShardWriter(job, index)
    truncated = False
    for i, row in rows:
        samples, skipped = _convert_row(job, i, row, w.counter)
        w.stats.rows_read += 1
        w.stats.rows_skipped += int(skipped)
        w.stats.rows = (w.stats.rows[0], i + 1)
        if on_row:
            on_row(1)
        for s in samples:
            if budget is not None and w.stats.samples >= budget:
                truncated = True
                break
            w.write(s)
        if truncated:
            break
        if budget is not None and w.stats.samples >= budget:
            # Out of budget before the shard's last row: a re-run must redo this shard.
            truncated = i + 1 < (index + 1) * job.shard_size
            break
    return w.close(complete=not truncated)


_POOL_JOB: Job | None = None  # set before forking workers; children inherit it (no pickling of sources)


def _pool_write(index: int) -> ShardStats:
    assert _POOL_JOB is not None
    job = _POOL_JOB
    start = index * job.shard_size
    return _write_shard(job, index, job.source.iter_rows(start, start + job.shard_size), None)


def run(job: Job, workers: int = 1, progress: bool = True, desc: str = "converting") -> Summary:
    """Convert every not-yet-finished shard of `job`; returns (and writes) the summary."""
    job.output.mkdir(parents=True, exist_ok=True)
    (job.output / PROGRESS_DIR).mkdir(exist_ok=True)
    summary = Summary(output=str(job.output))
    t0 = time.perf_counter()
    total = job.source.num_rows()
    # A sample budget is shared by all shards, so a dry run (--max-samples) converts one shard at a time.
    if workers > 1 and total is not None and job.max_samples is None:
        _run_parallel(job, workers, total, summary, progress, desc)
    else:
        _run_sequential(job, total, summary, progress, desc)
    summary.seconds = time.perf_counter() - t0
    _write_atomic(job.output / SUMMARY_FILE, json.dumps(asdict(summary) | {"rows_per_second":
                                                                          summary.rows_per_second}, indent=1))
    return summary


def _run_sequential(job: Job, total: int | None, summary: Summary, progress: bool, desc: str) -> None:
    bar = tqdm(total=total, desc=desc, unit="row", disable=not progress, dynamic_ncols=True)
    index = 0
    while True:
        done = job.finished(index)
        if done is not None:
            summary.add(done, resumed=True)
            bar.update(done.rows[1] - done.rows[0])
            index += 1
            continue
        start = index * job.shard_size
        if total is not None and start >= total:
            break
        budget = None if job.max_samples is None else job.max_samples - summary.samples
        if budget is not None and budget <= 0:
            break
        rows = job.source.iter_rows(start, start + job.shard_size)
        st = _write_shard(job, index, rows, budget, bar.update)
        if st.rows_read == 0 and st.samples == 0:
            job.progress_path(index).unlink(missing_ok=True)  # past the end of an input of unknown length
            break
        summary.add(st, resumed=False)
        bar.set_postfix(samples=summary.samples, skipped=sum(summary.skipped.values()))
        index += 1
    bar.close()


def _run_parallel(job: Job, workers: int, total: int, summary: Summary, progress: bool, desc: str) -> None:
    global _POOL_JOB
    n_shards = -(-total // job.shard_size)
    todo = []
    for index in range(n_shards):
        done = job.finished(index)
        if done is not None:
            summary.add(done, resumed=True)
        else:
            todo.append(index)
    bar = tqdm(total=len(todo), desc=f"{desc} ({workers} workers)", unit="shard", disable=not progress)
    _POOL_JOB = job
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for st in pool.imap_unordered(_pool_write, todo):
                summary.add(st, resumed=False)
                bar.update(1)
                bar.set_postfix(samples=summary.samples, skipped=sum(summary.skipped.values()))
    finally:
        _POOL_JOB = None
        bar.close()


# ---------------------------------------------------------------------------------------------- command line

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
    job = Job(source=source, convert=convert, output=args.output, prefix=args.prefix or name,
              shard_size=args.shard_size, max_samples=args.max_samples, seed=args.seed, strict=args.strict)
    summary = run(job, workers=args.workers, progress=not args.quiet, desc=name)
    print(summary.text())
    return summary
