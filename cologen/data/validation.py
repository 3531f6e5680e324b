"""Validation: a fixed, non-resampled set per task, built the same way every time.

The first `n` samples of a task's validation shards (in shard order, no shuffling) are read once and kept
as raw bytes; example `i` is rebuilt on demand with a generator seeded by (seed, task, i) and independent
(non-stratified) choices, so every epoch, every rank and every run sees the very same examples.

An item of the dataset is a whole collated batch: consecutive examples of one output size (with
aspect-ratio buckets, examples of different buckets never share a batch). Its DataLoader uses
`batch_size=None`. Under DDP, `RankShare` gives each batch to exactly one rank and pads the shorter ranks with
batches marked `valid` False, so every rank runs as many steps (FSDP needs every rank in every forward) and
metrics count each example once; Lightning's own sampler would instead repeat real batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cologen.data.builders import BuilderConfig, Example, TaskBuilder
from cologen.data.collate import collate
from cologen.data.precomputed import PrecomputedArrays
from cologen.data.reader import ShardReader
from cologen.data.records import decode_sample
from cologen.data.skips import SkipCounter
from cologen.data.tasks import TASKS


class FixedTaskDataset(torch.utils.data.Dataset):
    def __init__(self, urls: Sequence[str], task: str, n: int, skips: SkipCounter, *, builder: BuilderConfig,
                 resolution: int, buckets: list[tuple[int, int]] | None, seed: int, batch_size: int = 8,
                 arrays: PrecomputedArrays | None = None):
        self.task, self.seed, self.arrays = task, seed, arrays
        self.builder = TaskBuilder(builder, resolution, buckets, stratified=False)
        fields = self.builder.fields(task)
        stream = ShardReader(skips)({"url": u} for u in urls)  # in shard order; a repeated key is read once
        self.raw: list[dict[str, Any]] = []
        sizes: list[tuple[int, int]] = []
        for raw in stream:
            if len(self.raw) >= n:
                break
            try:  # keep only samples that build: a bad one is counted and replaced by the next
                ex = self.builder(decode_sample(raw, fields), task, self._rng(len(self.raw)))
            except Exception as exn:  # noqa: BLE001 - the handler decides (counts, or re-raises)
                skips(exn)
                continue
            skips.ok()
            self.raw.append(raw)
            sizes.append(ex["target"].shape[:2])
        if not self.raw:
            raise ValueError(f"val_shards.{task}: no usable validation sample in {list(urls)[:3]}...")
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(sizes):
            by_size.setdefault(size, []).append(i)
        self.batches = [idx[j:j + batch_size] for idx in by_size.values() for j in range(0, len(idx), batch_size)]

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, TASKS.index(self.task), index])

    @property
    def num_examples(self) -> int:
        return len(self.raw)

    def example(self, index: int) -> Example:
        raw = self.raw[index]
        ex = self.builder(decode_sample(raw, self.builder.fields(self.task)), self.task, self._rng(index))
        return self.arrays.attach(ex, raw) if self.arrays is not None else ex

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Batch `index`; index `len(self)` is `RankShare`'s padding batch: a copy of batch 0, marked not `valid`."""
        if not 0 <= index <= len(self.batches):
            raise IndexError(f"batch {index} of a validation set of {len(self.batches)}")
        padding = index == len(self.batches)
        batch = collate([self.example(i) for i in self.batches[0 if padding else index]], self.arrays)
        batch["valid"] = torch.full((len(batch["key"]),), not padding, dtype=torch.bool)
        batch["batch_index"] = index  # its place in the set, the same on any number of ranks (seeds its noise)
        return batch


class RankShare(torch.utils.data.distributed.DistributedSampler):
    """This rank's batches of a validation set of `n`: batches rank, rank + W, ... (each on exactly one rank), then
    at most one padding item (index n, marked not `valid` by the dataset) up to ceil(n / W), the steps every rank
    runs.

    A `DistributedSampler`, so that Lightning keeps it instead of putting its own (which repeats real batches).
    """

    def __init__(self, n: int, rank: int, world_size: int):
        super().__init__(range(n), num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)
        mine = list(range(rank, n, world_size))
        self.indices = mine + [n] * (-(-n // world_size) - len(mine))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
