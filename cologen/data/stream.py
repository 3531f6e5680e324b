"""The training stream of one rank, as a pure function of (seed, rank, epoch, position) and the schedule.

Batch b of epoch e belongs to *logical stream* s = b % S (S = max(1, num_workers)), as its batch m = b // S.
A logical stream has, per task, a `TaskStream`: shards (resampled by a seed, or this rank and stream's own
split) -> tar samples -> shuffle buffer (raw bytes) -> decode + build. Its examples are numbered by *slot*:
slot i is built from raw sample i with a generator seeded by (task seed, i) and kinds dealt at index i, so
slot i never depends on what happened to the slots before it. A bad raw sample is replaced by the next good
one, built with the bad slot's own choices (that sample then appears twice, in different variants): slot i
is always tied to raw sample i, so skipping n slots is skipping n raw samples, before decoding.

The tasks of a batch are dealt (`IndexedDealer`) from the weights the schedule gives its global index, with
a dealer per (stream, schedule entry) indexed by the sample's position in that entry: exact proportions,
and a pure function of the batch index. So a stream can start at any batch m0: count the tasks of batches
0..m0-1 (arithmetic) and skip that many raw samples per task (tar reading and the shuffle buffer, no image
decoding, no building). With aspect-ratio buckets a batch is the first bucket to fill, which depends on
the decoded samples, so there the stream replays batches 0..m0-1 (decode and build, no collation). Tasks with
several conditions (`MULTI_CONDITION_TASKS`) are bucketed the same way, by target size and condition count, so a
batch holds one condition count (docs/multi_condition.md).
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import webdataset as wds

from cologen.data.builders import BuilderConfig, Example, TaskBuilder
from cologen.data.choice import IndexedDealer
from cologen.data.collate import collate
from cologen.data.precomputed import PrecomputedArrays
from cologen.data.reader import ShardReader
from cologen.data.records import decode_sample
from cologen.data.schedule import MixtureState, Schedule, entry_at
from cologen.data.skips import SkipCounter
from cologen.data.tasks import MULTI_CONDITION_TASKS, TASKS

Finish = Callable[[Example, dict[str, Any]], Example]  # (built example, its raw sample) -> example
_DEAL_TAG = 1000  # seeds of the task dealers, apart from the task streams' seeds


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes (unlike hash() of strings)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


def _disjoint_shards(urls: Sequence[str], index: int, stride: int, seed: int) -> Iterator[dict[str, str]]:
    """Without resampling: this reader's own shards (split_by_node then split_by_worker semantics),
    reshuffled on each pass, forever."""
    mine = list(urls)[index::stride]
    for pass_no in itertools.count():
        order = np.random.default_rng([seed, pass_no]).permutation(len(mine))
        for i in order:
            yield {"url": mine[i]}


def raw_samples(urls: Sequence[str], skips: SkipCounter, *, seed: int, resampled: bool, split_index: int,
                split_stride: int, shuffle_buffer: int) -> Iterator[dict[str, Any]]:
    """The infinite stream of raw (undecoded) samples of one task for one logical stream of one rank."""
    if resampled:
        source = wds.ResampledShards(list(urls), seed=seed, worker_seed=lambda: 0, deterministic=True)
    else:
        source = wds.DataPipeline(lambda: _disjoint_shards(urls, split_index, split_stride, seed))
    stages: list[Any] = [source, ShardReader(skips)]  # manifests, duplicates, one count per failure
    if shuffle_buffer > 1:  # shuffle raw bytes, before decoding
        stages.append(wds.shuffle(shuffle_buffer, initial=min(100, shuffle_buffer), seed=seed))
    return iter(wds.DataPipeline(*stages))


class _Raw:
    __slots__ = ("raw", "bad")

    def __init__(self, raw: dict[str, Any]):
        self.raw, self.bad = raw, False  # bad: failed to decode (that does not depend on the slot)


class TaskStream:
    """The examples of one task, slot by slot (see the module docstring)."""

    def __init__(self, task: str, raw: Iterator[dict[str, Any]], builder: TaskBuilder, skips: SkipCounter,
                 seed: int, finish: Finish | None = None, where: str = ""):
        self.task, self.raw, self.builder, self.skips, self.seed = task, raw, builder, skips, seed
        self.fields, self.finish, self.where = builder.fields(task), finish, where
        self.slot = 0
        self._ahead: deque[_Raw] = deque()  # raw samples slot, slot + 1, ... already read

    def _pull(self) -> dict[str, Any]:
        try:
            return next(self.raw)
        except StopIteration:
            raise RuntimeError(f"the {self.task!r} stream {self.where} ended; it has no shards "
                               "(fewer shards than ranks x workers?)") from None

    def skip(self, n: int) -> None:
        """Advance n slots without decoding anything."""
        for _ in range(n):
            if self._ahead:
                self._ahead.popleft()
            else:
                self._pull()
        self.slot += n

    def next(self) -> Example:
        i = self.slot
        for offset in itertools.count():
            while len(self._ahead) <= offset:
                self._ahead.append(_Raw(self._pull()))
            item = self._ahead[offset]
            if item.bad:
                continue
            try:
                sample = decode_sample(item.raw, self.fields)
            except Exception as exn:  # noqa: BLE001 - the handler counts it, or raises
                item.bad = True
                self.skips(exn)
                continue
            try:
                rng = np.random.default_rng([self.seed, i, offset])
                ex = self.builder(sample, self.task, rng, index=i)
                if self.finish is not None:
                    ex = self.finish(ex, item.raw)
            except Exception as exn:  # noqa: BLE001
                self.skips(exn)
                continue
            self.skips.ok()
            self._ahead.popleft()
            self.slot += 1
            return ex
        raise AssertionError("unreachable")


class LogicalStream:
    """Batches m0, m0 + 1, ... of logical stream `stream` of `n_streams`, in epoch `epoch` of rank `rank`."""

    def __init__(self, shards: Mapping[str, Sequence[str]], state: MixtureState, skips: SkipCounter, *,
                 builder: BuilderConfig, resolution: int, buckets: list[tuple[int, int]] | None, batch_size: int,
                 seed: int, rank: int, world_size: int, epoch: int, stream: int, n_streams: int,
                 batches_per_epoch: int, resampled: bool, shuffle_buffer: int,
                 arrays: PrecomputedArrays | None = None):
        self.state, self.batch_size, self.arrays = state, batch_size, arrays
        self.bucketed = bool(buckets) or any(t in MULTI_CONDITION_TASKS for t in shards)
        finish = arrays.attach if arrays is not None else None
        self.epoch, self.stream, self.n_streams, self.bpe = epoch, stream, n_streams, batches_per_epoch
        self.base = [seed, rank, epoch, stream]
        self.streams: dict[str, TaskStream] = {}
        for t, urls in shards.items():
            task_seed = derive_seed(*self.base, TASKS.index(t))
            raw = raw_samples(urls, skips, seed=task_seed, resampled=resampled,
                              split_index=rank * n_streams + stream, split_stride=world_size * n_streams,
                              shuffle_buffer=shuffle_buffer)
            task_builder = TaskBuilder(builder, resolution, buckets, stratified=True, deal_seed=task_seed)
            self.streams[t] = TaskStream(t, raw, task_builder, skips, task_seed, finish,
                                         where=f"of rank {rank}, epoch {epoch}, stream {stream}")
        self._dealers: dict[tuple[int, tuple[tuple[str, float], ...]], IndexedDealer] = {}

    def global_index(self, m: int) -> int:
        return self.epoch * self.bpe + self.stream + m * self.n_streams

    def _dealer(self, start: int, weights: Mapping[str, float]) -> IndexedDealer:
        key = (start, tuple(sorted(weights.items())))
        if key not in self._dealers:
            self._dealers[key] = IndexedDealer(weights, derive_seed(*self.base, _DEAL_TAG, start))
        return self._dealers[key]

    def batch_tasks(self, schedule: Schedule, m: int) -> list[str]:
        """The task of each example of batch m: position k x batch_size + j of its schedule entry's deal,
        k = this stream's batches in that entry (and epoch) before m."""
        b = self.stream + m * self.n_streams
        start, weights = entry_at(schedule, self.epoch * self.bpe + b)
        lo = max(0, start - self.epoch * self.bpe)  # the entry's first batch in this epoch
        first = lo + (self.stream - lo) % self.n_streams  # ... and this stream's first batch in it
        k = (b - first) // self.n_streams
        dealer = self._dealer(start, weights)
        return [dealer.at(k * self.batch_size + j) for j in range(self.batch_size)]

    def batches(self, m0: int = 0) -> Iterator[dict[str, Any]]:
        if self.bucketed:
            yield from self._bucketed(m0)
            return
        schedule = self.state.schedule()
        skipped = Counter(t for m in range(m0) for t in self.batch_tasks(schedule, m))
        for t, n in skipped.items():
            self.streams[t].skip(n)
        for m in itertools.count(m0):
            tasks = self.batch_tasks(self.state.schedule(), m)  # read per batch: set_mixture reaches us
            yield collate([self.streams[t].next() for t in tasks], self.arrays)

    def _bucketed(self, m0: int) -> Iterator[dict[str, Any]]:
        """A batch is the first bucket (output size, condition count) to fill; examples left in other buckets wait for later
        batches of the same schedule entry, and are dropped when the entry changes (so a batch never mixes
        two entries' weights). Batches before m0 are replayed (built, not collated)."""
        pending: dict[tuple[int, ...], list[Example]] = {}
        entry: tuple[int, dict[str, float]] | None = None
        m = slot = 0
        dealer: IndexedDealer | None = None
        while True:
            current = entry_at(self.state.schedule(), self.global_index(m))
            if current != entry:
                entry, slot, dealer = current, 0, self._dealer(*current)
                pending.clear()
            ex = self.streams[dealer.at(slot)].next()
            slot += 1
            bucket = (*ex["target"].shape[:2], len(ex.get("extra_sources") or ()))
            group = pending.setdefault(bucket, [])
            group.append(ex)
            if len(group) == self.batch_size:
                del pending[bucket]
                if m >= m0:
                    yield collate(group, self.arrays)
                m += 1
