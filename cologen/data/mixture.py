"""The training stream: one webdataset pipeline per task, mixed in exact proportions, batched per worker.

Per worker (and per rank), each task has its own pipeline

    shards (resampled, or split by rank and worker) -> tar samples -> shuffle buffer -> decode + build

and a `StratifiedChooser` picks the task of every sample from the mixture weights, so a worker's stream
matches the weights exactly (within one sample per task at each 100-sample block boundary). A bad sample
is skipped inside its task's pipeline and the next one of the *same* task is taken, so skips do not bend
the mixture.

The weights live in shared memory (`MixtureState`), written by the DataModule's `set_mixture` in the main
process and read by every worker before each sample: a change takes effect in the workers at once and in
the batches the training step receives after at most the batches already queued
(see `MixtureDataModule.mixture_latency_samples`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import webdataset as wds

from cologen.data.builders import BuilderConfig, Example, TaskBuilder
from cologen.data.choice import StratifiedChooser, normalized
from cologen.data.collate import already_collated, collate
from cologen.data.records import decode_sample
from cologen.data.skips import SkipCounter
from cologen.data.tasks import TASKS


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes (unlike hash() of strings)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


class MixtureState:
    """Mixture weights and an epoch counter in a shared-memory tensor, guarded by a sequence lock.

    Layout: [version, epoch, w_0 .. w_{n-1}] (float64). The writer makes `version` odd while it writes,
    even when done; a reader retries until it sees the same even version before and after reading.
    """

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float]):
        self.tasks = tuple(tasks)
        self._buf = torch.zeros(2 + len(self.tasks), dtype=torch.float64).share_memory_()
        self._view = self._buf.numpy()  # same memory; reading numpy is ~100x cheaper than tensor indexing
        self.set(weights)

    def __getstate__(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "_buf": self._buf}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.tasks, self._buf = state["tasks"], state["_buf"]
        self._view = self._buf.numpy()

    def set(self, weights: Mapping[str, float]) -> None:
        p = normalized(weights, "mixture")
        unknown = set(p) - set(self.tasks)
        if unknown:
            raise ValueError(f"mixture: no shards configured for {sorted(unknown)}; have {list(self.tasks)}")
        self._view[0] += 1
        for i, t in enumerate(self.tasks):
            self._view[2 + i] = p.get(t, 0.0)
        self._view[0] += 1

    def version(self) -> int:
        return int(self._view[0])

    def read(self) -> tuple[int, dict[str, float]]:
        while True:
            v1 = self.version()
            if v1 % 2:
                continue
            values = self._view[2:].tolist()
            if self.version() == v1:
                return v1, dict(zip(self.tasks, values))

    @property
    def weights(self) -> dict[str, float]:
        return {t: w for t, w in self.read()[1].items() if w > 0}

    @property
    def epoch(self) -> int:
        return int(self._view[1])

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._view[1] = float(value)


def _disjoint_shards(urls: Sequence[str], index: int, stride: int, seed: int) -> Iterator[dict[str, str]]:
    """Without resampling: this worker's own shards (split_by_node then split_by_worker semantics),
    reshuffled on each pass, forever."""
    mine = list(urls)[index::stride]
    for pass_no in itertools.count():
        order = np.random.default_rng([seed, pass_no]).permutation(len(mine))
        for i in order:
            yield {"url": mine[i]}


class _BuildStage:
    """decode + build one raw sample; raises on a bad one (the pipeline's handler counts and skips it)."""

    def __init__(self, builder: TaskBuilder, task: str, rng: np.random.Generator, skips: SkipCounter):
        self.builder, self.task, self.rng, self.skips = builder, task, rng, skips
        self.fields = builder.fields(task)

    def __call__(self, raw: dict[str, Any]) -> Example:
        example = self.builder(decode_sample(raw, self.fields), self.task, self.rng)
        self.skips.ok()
        return example


def task_pipeline(urls: Sequence[str], task: str, builder: TaskBuilder, skips: SkipCounter, *, seed: int,
                  resampled: bool, split_index: int, split_stride: int, shuffle_buffer: int) -> wds.DataPipeline:
    """The infinite stream of built examples of one task for one worker of one rank."""
    if resampled:
        source = wds.ResampledShards(list(urls), seed=seed, worker_seed=lambda: 0, deterministic=True)
    else:
        source = wds.DataPipeline(lambda: _disjoint_shards(urls, split_index, split_stride, seed))
    rng = np.random.default_rng(seed)
    stages: list[Any] = [source, wds.tarfile_to_samples(handler=skips)]
    if shuffle_buffer > 1:  # shuffle raw bytes, before decoding
        stages.append(wds.shuffle(shuffle_buffer, initial=min(100, shuffle_buffer), seed=seed))
    stages.append(wds.map(_BuildStage(builder, task, rng, skips), handler=skips))
    return wds.DataPipeline(*stages)


def batches(examples: Iterator[Example], batch_size: int, bucketed: bool) -> Iterator[dict[str, Any]]:
    """Collated batches; with aspect-ratio buckets, a batch is filled from one bucket (target size)."""
    if not bucketed:
        while True:
            yield collate(list(itertools.islice(examples, batch_size)))
    pending: dict[tuple[int, int], list[Example]] = {}
    for ex in examples:
        group = pending.setdefault(ex["target"].shape[:2], [])
        group.append(ex)
        if len(group) == batch_size:
            yield collate(group)
            pending[ex["target"].shape[:2]] = []


class MixtureDataset(torch.utils.data.IterableDataset):
    """Yields collated batches, forever; the loader (`with_epoch`) sets the epoch length."""

    def __init__(self, shards: Mapping[str, Sequence[str]], state: MixtureState, skips: SkipCounter, *,
                 builder: BuilderConfig, resolution: int, buckets: list[tuple[int, int]] | None,
                 batch_size: int, seed: int, rank: int, world_size: int, resampled: bool,
                 shuffle_buffer: int, block: int = 100):
        super().__init__()
        self.shards = {t: list(u) for t, u in shards.items()}
        self.state, self.skips = state, skips
        self.builder_config, self.resolution, self.buckets = builder, resolution, buckets
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.resampled, self.shuffle_buffer, self.block = resampled, shuffle_buffer, block

    def _examples(self, worker: int, num_workers: int) -> Iterator[Example]:
        epoch = self.state.epoch
        # every (seed, rank, worker, epoch) draws its own stream; a new epoch draws new variants
        base = [self.seed, self.rank, worker, epoch]
        builder = TaskBuilder(self.builder_config, self.resolution, self.buckets, stratified=True)
        streams: dict[str, Iterator[Example]] = {}
        split_index, split_stride = self.rank * num_workers + worker, self.world_size * num_workers
        for t in self.shards:
            # resampled: each (rank, worker) draws shards by its own seed; else it reads its own split
            task_seed = derive_seed(*base, TASKS.index(t))
            streams[t] = iter(task_pipeline(self.shards[t], t, builder, self.skips, seed=task_seed,
                                            resampled=self.resampled, split_index=split_index,
                                            split_stride=split_stride, shuffle_buffer=self.shuffle_buffer))
        rng = np.random.default_rng([*base, 7])
        version, chooser = -1, None
        while True:
            if self.state.version() != version:  # set_mixture: start a fresh exact block
                version, weights = self.state.read()
                chooser = StratifiedChooser({t: w for t, w in weights.items() if w > 0}, self.block)
            task = chooser.draw(rng)
            try:
                yield next(streams[task])
            except StopIteration:
                raise RuntimeError(f"the {task!r} stream of rank {self.rank} worker {worker} ended; "
                                   "it has no shards (fewer shards than ranks x workers?)") from None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        # No cv2.setNumThreads here: in a forked worker it deadlocks once the parent has used OpenCV's pool.
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return batches(self._examples(worker, num_workers), self.batch_size, bool(self.buckets))


class MixtureLoader(wds.WebLoader):
    """A WebLoader of per-worker batches whose epoch is `batches_per_epoch` batches (`with_epoch` on the
    loader, so the length does not multiply with workers); each new epoch bumps the shared epoch counter,
    so the workers' streams never repeat."""

    def __init__(self, dataset: MixtureDataset, batches_per_epoch: int, **kwargs: Any):
        super().__init__(dataset, batch_size=None, shuffle=False, collate_fn=already_collated, **kwargs)
        self.state = dataset.state
        self.batches_per_epoch = batches_per_epoch
        self.with_epoch(batches_per_epoch)

    def __iter__(self):
        self.state.epoch = self.state.epoch + 1
        return super().__iter__()

    def __len__(self) -> int:
        return self.batches_per_epoch
