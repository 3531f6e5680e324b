"""Resumable shard writing: a recipe's rows converted into shards, with progress files and a summary (`run`).

Also `run_jobs`, the loop that runs a list of shard jobs in this process or in a fork pool under one progress
bar; `run` and the ShapeWorld generator both use it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import pickle
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from cologen.data.manifest import ShardWriter
from data_recipes._rows import Convert, RowContext, RowSource, Sample, Skip

log = logging.getLogger("data_recipes")

PROGRESS_DIR = "_progress"
SUMMARY_FILE = "summary.json"

J = TypeVar("J")
R = TypeVar("R")


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
    holdout: str | None = None  # 'val': only the held-out rows (`held_out`); 'train': only the others; None: all
    holdout_fraction: float = 0.01

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


def held_out(index: int, fraction: float) -> bool:
    """Whether input row `index` is held out for validation: a hash of the row's index, so the two sides of the
    same inputs never share a row (every sample a row gives stays on its side) and need no shared state."""
    digest = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < fraction


def _convert_row(job: Job, index: int, row: dict[str, Any], counter: Counter) -> tuple[list[Sample], bool]:
    """(samples, row_was_skipped)."""
    if job.holdout is not None and held_out(index, job.holdout_fraction) != (job.holdout == "val"):
        counter["held out for validation" if job.holdout == "train" else "not held out"] += 1
        return [], True
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




_POOL_WORK: tuple[Callable[[Any], Any], Sequence[Any]] | None = None  # set before forking; children inherit it


def _pool_call(i: int) -> tuple[int, Any]:
    assert _POOL_WORK is not None
    work, jobs = _POOL_WORK
    return i, work(jobs[i])


def _pickled_call(task: tuple[int, Callable[[Any], Any], Any]) -> tuple[int, Any]:
    i, work, job = task
    return i, work(job)


def _spawn_needed(work: Callable) -> bool:
    """macOS: a forked child of a process that loaded system frameworks can crash, so a module-level `work`
    (which pickles by name) runs in a spawn pool there; everywhere else, and for closures, the pool forks."""
    if sys.platform != "darwin":
        return False
    try:
        pickle.dumps(work)
    except (pickle.PicklingError, AttributeError, TypeError):
        return False
    return True


def run_jobs(work: Callable[[J], R], jobs: Sequence[J], workers: int = 1, *, desc: str, unit: str = "job",
             weight: Callable[[J], int] | None = None, on_done: Callable[[R], dict[str, Any] | None] | None = None,
             progress: bool = True) -> None:
    """Run `work(job)` for every job: in this process, or in a process pool when `workers` > 1 and there are jobs
    enough, under one progress bar.

    Forked pool workers inherit `work` and `jobs` (only results are pickled), so `work` may be a closure (macOS:
    a module-level `work` runs in a spawn pool instead);
    results arrive in completion order. After each job `on_done(result)` runs in this process (a dict it returns
    becomes the bar's postfix) and the bar advances by `weight(job)` (1 by default; the total is their sum).
    """
    global _POOL_WORK
    size = weight or (lambda _: 1)
    bar = tqdm(total=sum(size(j) for j in jobs), desc=desc, unit=unit, disable=not progress)

    def done(i: int, result: Any) -> None:
        postfix = on_done(result) if on_done is not None else None
        bar.update(size(jobs[i]))
        if postfix:
            bar.set_postfix(**postfix)

    processes = min(workers, len(jobs))
    outer = _POOL_WORK
    try:
        if processes <= 1:
            for i, j in enumerate(jobs):
                done(i, work(j))
        else:
            if _spawn_needed(work):
                with multiprocessing.get_context("spawn").Pool(processes) as pool:
                    for i, result in pool.imap_unordered(_pickled_call, [(i, work, j) for i, j in enumerate(jobs)]):
                        done(i, result)
            else:
                _POOL_WORK = (work, jobs)
                with multiprocessing.get_context("fork").Pool(processes) as pool:
                    for i, result in pool.imap_unordered(_pool_call, range(len(jobs))):
                        done(i, result)
    finally:
        _POOL_WORK = outer
        bar.close()


def run(job: Job, workers: int = 1, progress: bool = True, desc: str = "converting") -> Summary:
    """Convert every not-yet-finished shard of `job`; returns (and writes) the summary.

    * Input rows are assigned to output shards deterministically: shard `i` holds the samples of input rows
      `[i * shard_size, (i + 1) * shard_size)`. So `--shard-size` counts *input rows*, and a re-run knows which
      rows each finished shard covers without reading it.
    * A shard is written to `NAME.tar.tmp` and renamed when complete; then `_progress/NAME.json` records its
      counts. A re-run skips every shard whose progress file says complete, so an interrupted conversion resumes.
    * A row that cannot be converted raises `Skip(reason)`; a sample dropped from a row calls `ctx.skip(reason)`.
      Both are counted by reason and reported, never fatal. Unexpected exceptions are counted as
      `error: TypeName` (re-raised with `--strict`).
    """
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
    n_shards = -(-total // job.shard_size)
    todo = []
    for index in range(n_shards):
        done = job.finished(index)
        if done is not None:
            summary.add(done, resumed=True)
        else:
            todo.append(index)

    def write(index: int) -> ShardStats:  # in a forked worker: the job (and its source) is inherited, not pickled
        start = index * job.shard_size
        return _write_shard(job, index, job.source.iter_rows(start, start + job.shard_size), None)

    def add(st: ShardStats) -> dict[str, Any]:
        summary.add(st, resumed=False)
        return {"samples": summary.samples, "skipped": sum(summary.skipped.values())}

    run_jobs(write, todo, workers, desc=f"{desc} ({workers} workers)", unit="shard", on_done=add, progress=progress)
