"""Validation: a fixed, non-resampled set per task, built the same way every time.

The first `n` samples of a task's validation shards (in shard order, no shuffling) are read once and kept
as raw bytes; example `i` is rebuilt on demand with a generator seeded by (seed, task, i) and independent
(non-stratified) choices, so every epoch, every rank and every run sees the very same examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import webdataset as wds

from cologen.data.builders import BuilderConfig, Example, TaskBuilder
from cologen.data.records import decode_sample
from cologen.data.skips import SkipCounter
from cologen.data.tasks import TASKS


class FixedTaskDataset(torch.utils.data.Dataset):
    def __init__(self, urls: Sequence[str], task: str, n: int, skips: SkipCounter, *, builder: BuilderConfig,
                 resolution: int, buckets: list[tuple[int, int]] | None, seed: int):
        self.task, self.seed = task, seed
        self.builder = TaskBuilder(builder, resolution, buckets, stratified=False)
        fields = self.builder.fields(task)
        stream = wds.WebDataset(list(urls), shardshuffle=False, nodesplitter=None, workersplitter=None,
                                handler=skips, empty_check=False)
        self.raw: list[dict[str, Any]] = []
        for raw in stream:
            if len(self.raw) >= n:
                break
            try:  # keep only samples that build: a bad one is counted and replaced by the next
                self.builder(decode_sample(raw, fields), task, self._rng(len(self.raw)))
            except Exception as exn:  # noqa: BLE001 - the handler decides (counts, or re-raises)
                skips(exn)
                continue
            skips.ok()
            self.raw.append(raw)
        if not self.raw:
            raise ValueError(f"val_shards.{task}: no usable validation sample in {list(urls)[:3]}...")

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, TASKS.index(self.task), index])

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int) -> Example:
        raw = self.raw[index]
        return self.builder(decode_sample(raw, self.builder.fields(self.task)), self.task, self._rng(index))
