"""The training loader: per-worker logical streams (`stream.py`) dealt out in loader order, one epoch per `iter()`.

Loader batch j of an iterator that starts at batch b0 of epoch e is batch b = b0 + j of the epoch; the
DataLoader takes batch j from worker j % W (in order), so worker w serves logical stream (b0 + w) % W from
its batch (b0 + w) // W on. Whatever b0 is, batch b always comes from the same logical stream at the same
position: an iterator started mid-epoch yields exactly the batches an iterator started at 0 yields from b0.

Where an iterator starts comes from the trainer's progress (`MixtureDataModule`), or, outside a trainer,
each `iter()` starts the next epoch. The start and the schedule reach forked, persistent workers through
the shared `MixtureState`, written before the DataLoader (re)starts its workers.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from cologen.compat import shutdown_dataloader_workers
from cologen.data.builders import BuilderConfig
from cologen.data.collate import already_collated
from cologen.data.precomputed import PrecomputedArrays
from cologen.data.schedule import MixtureState
from cologen.data.skips import SkipCounter
from cologen.data.stream import LogicalStream


class MixtureDataset(torch.utils.data.IterableDataset):
    """Yields collated batches of this worker's logical stream, forever, from the state's start."""

    def __init__(self, shards: Mapping[str, Sequence[str]], state: MixtureState, skips: SkipCounter, *,
                 builder: BuilderConfig, resolution: int, buckets: list[tuple[int, int]] | None,
                 batch_size: int, seed: int, rank: int, world_size: int, resampled: bool,
                 shuffle_buffer: int, batches_per_epoch: int, arrays: PrecomputedArrays | None = None):
        super().__init__()
        self.shards = {t: list(u) for t, u in shards.items()}
        self.state, self.skips, self.arrays = state, skips, arrays
        self.builder_config, self.resolution, self.buckets = builder, resolution, buckets
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.resampled, self.shuffle_buffer, self.batches_per_epoch = resampled, shuffle_buffer, batches_per_epoch

    def stream(self, epoch: int, stream: int, n_streams: int) -> LogicalStream:
        return LogicalStream(
            self.shards, self.state, self.skips, builder=self.builder_config, resolution=self.resolution,
            buckets=self.buckets, batch_size=self.batch_size, seed=self.seed, rank=self.rank,
            world_size=self.world_size, epoch=epoch, stream=stream, n_streams=n_streams,
            batches_per_epoch=self.batches_per_epoch, resampled=self.resampled,
            shuffle_buffer=self.shuffle_buffer, arrays=self.arrays)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        # No cv2.setNumThreads here: in a forked worker it deadlocks once the parent has used OpenCV's pool.
        worker, n = (0, 1) if info is None else (info.id, info.num_workers)
        epoch, b0 = self.state.start()
        return self.stream(epoch, (b0 + worker) % n, n).batches((b0 + worker) // n)


class MixtureLoader:
    """`batches_per_epoch` batches per epoch (`len()`); `iter()` starts at the global batch index `start()`
    returns (the DataModule's: the trainer's position, else the epoch after the previous iterator's; by
    default the epoch after this loader's previous one) and yields the rest of that epoch.

    It tracks the batches handed out, so the DataModule knows the first batch no worker can have started yet
    (`frontier`), where `set_mixture` can switch the mixture exactly.
    """

    def __init__(self, dataset: MixtureDataset, batches_per_epoch: int,
                 start: Callable[[], int] | None = None, num_workers: int = 0, prefetch_factor: int = 2):
        self._dataset, self.state = dataset, dataset.state  # not `.dataset`: Lightning would warn about len()
        self.batches_per_epoch = batches_per_epoch
        self.start = start or (lambda: self.epoch_end)
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        extra: dict[str, Any] = {"persistent_workers": True, "prefetch_factor": prefetch_factor} if num_workers else {}
        self.loader = DataLoader(dataset, batch_size=None, shuffle=False, collate_fn=already_collated,
                                 num_workers=num_workers, **extra)
        self._generation = 0
        self.received = 0  # global index of the next batch this loader hands out
        self.epoch_end = 0  # global index just past the current iterator's epoch

    @property
    def active(self) -> bool:
        """An iterator has batches left to hand out (Lightning stops at len() without exhausting it)."""
        return self.received < self.epoch_end

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def frontier(self) -> int:
        """The first global batch index that no worker can have started: the DataLoader keeps at most
        prefetch_factor x workers batches requested beyond those handed out, and the next epoch starts fresh."""
        return min(self.received + self.num_workers * self.prefetch_factor, self.epoch_end)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Lazy: nothing starts before the first next(). Lightning probes the loader with an iter() it never
        # advances; that must neither start (and fast-forward) workers nor apply a pending set_mixture.
        return self._epoch()

    def close(self) -> None:
        """Stop the workers now (a later `iter()` starts new ones). Left to garbage collection, persistent
        workers of an object in a reference cycle (Lightning's trainer and DataModule are one) take 5 s each."""
        shutdown_dataloader_workers(self.loader)
        self.epoch_end = self.received

    def _epoch(self) -> Iterator[dict[str, Any]]:
        start = self.start()
        epoch, b0 = divmod(start, self.batches_per_epoch)
        self.state.set_start(epoch, b0)  # before iter(): the workers read it when they (re)start
        self._generation += 1
        generation = self._generation
        self.received, self.epoch_end = start, (epoch + 1) * self.batches_per_epoch
        for batch in itertools.islice(iter(self.loader), self.batches_per_epoch - b0):
            if generation == self._generation:  # an abandoned iterator counts for nothing
                self.received += 1
            yield batch

    # Lightning calls these on loaders that have them (checkpoint save / restore). The position comes from
    # the trainer's own progress counters instead, so there is nothing to save; having them tells Lightning
    # that this loader resumes mid-epoch (otherwise it warns that it does not).
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass
