"""Count and log bad samples without stopping the loader.

The counts live in a shared-memory tensor, one row per DataLoader worker (row 0: the main process), so
workers never write the same cell and the DataModule reads the totals from the main process at any time.
A run of `max_consecutive` skips with no good sample in between means the data (or a builder) is broken,
not a few bad samples: that raises instead of spinning forever on a resampled stream.
"""

from __future__ import annotations

import logging
import tarfile

import torch

from cologen.data.reader import archive_reason
from cologen.data.records import SKIP_CATEGORIES, BadSample, one_line

log = logging.getLogger("cologen.data")


class DataBrokenError(RuntimeError):
    """Too many bad samples in a row: raised through the loader, never counted as a skip."""


def categorize(exn: BaseException) -> tuple[str, str]:
    """(category, one-line reason) of an exception met while reading or building a sample."""
    if isinstance(exn, BadSample):
        return exn.category, str(exn)
    if isinstance(exn, (tarfile.TarError, EOFError, OSError)):
        return "tar", archive_reason(exn)
    if isinstance(exn, UnicodeDecodeError):
        return "encoding", one_line(str(exn))
    return "build", one_line(f"{type(exn).__name__}: {exn}")


class SkipCounter:
    """A webdataset handler (`handler=counter`) that logs, counts and skips; see module docstring."""

    def __init__(self, slots: int = 1, max_consecutive: int = 1000, log_first: int = 20):
        self.counts = torch.zeros(max(1, slots), len(SKIP_CATEGORIES), dtype=torch.int64).share_memory_()
        self.max_consecutive = max_consecutive
        self.log_first = log_first
        self._run = 0  # per process: skips since the last good sample
        self._logged = 0

    @staticmethod
    def _slot() -> int:
        info = torch.utils.data.get_worker_info()
        return 0 if info is None else info.id + 1

    def __call__(self, exn: BaseException) -> bool:
        if isinstance(exn, (DataBrokenError, KeyboardInterrupt)):
            raise exn
        category, reason = categorize(exn)
        slot = self._slot() % self.counts.shape[0]
        self.counts[slot, SKIP_CATEGORIES.index(category)] += 1
        self._run += 1
        self._logged += 1
        if self._logged <= self.log_first or self._logged % 1000 == 0:
            log.warning("skipped bad sample [%s] %s (%d skipped in this process)", category, reason, self._logged)
        if self._run >= self.max_consecutive:
            raise DataBrokenError(f"{self._run} bad samples in a row, the last [{category}] {reason}; "
                                  "the shards or the builder options are broken")
        return True

    def ok(self) -> None:
        """Called for every good sample."""
        self._run = 0

    def by_category(self) -> dict[str, int]:
        totals = self.counts.sum(0).tolist()
        return {c: int(n) for c, n in zip(SKIP_CATEGORIES, totals)}

    def total(self) -> int:
        return int(self.counts.sum())


class SharedCounts:
    """Named event counters in shared memory, one row per DataLoader worker (row 0: the main process)."""

    def __init__(self, names: tuple[str, ...], slots: int = 1):
        self.names = names
        self.counts = torch.zeros(max(1, slots), len(names), dtype=torch.int64).share_memory_()

    def add(self, name: str, n: int = 1) -> None:
        self.counts[SkipCounter._slot() % self.counts.shape[0], self.names.index(name)] += n

    def totals(self) -> dict[str, int]:
        return {k: int(v) for k, v in zip(self.names, self.counts.sum(0).tolist())}
