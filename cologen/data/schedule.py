"""The mixture schedule: which task weights draw each training batch, by global batch index.

A schedule is a list of `(start, weights)` entries with strictly increasing starts, the first at 0; batch `g`
(the g-th training batch of the fit on this rank, counting across epochs: epoch e, batch b -> e x
batches_per_epoch + b) is drawn entirely with the weights of the last entry whose start <= g.

`MixtureState` keeps the schedule, and where the current training iterator starts, in a shared-memory
tensor: the DataModule writes it in the main process, every (forked, persistent) worker reads it at the
start of each batch, so a change reaches running workers.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from cologen.data.choice import normalized

Weights = dict[str, float]
Schedule = list[tuple[int, Weights]]
MAX_ENTRIES = 256


def check_schedule(schedule: Sequence[tuple[int, Mapping[str, float]]], tasks: Sequence[str],
                   what: str | None = None) -> Schedule:
    """The schedule with normalized weights (tasks with weight 0 dropped); a one-line error if it is malformed
    (`what` names a one-entry schedule's weights in errors, e.g. "mixture")."""
    if not schedule:
        raise ValueError("mixture schedule is empty; give at least [(0, {task: weight})]")
    if len(schedule) > MAX_ENTRIES:
        raise ValueError(f"mixture schedule has {len(schedule)} entries; at most {MAX_ENTRIES}")
    out: Schedule = []
    for i, entry in enumerate(schedule):
        name = what or f"mixture schedule[{i}]"
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[1], Mapping)):
            raise ValueError(f"{name} is not (start, {{task: weight}}): {entry!r}")
        start, weights = entry
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise ValueError(f"{name}: start must be an int >= 0 (a global batch index), got {start!r}")
        if out and start <= out[-1][0]:
            raise ValueError(f"{name}: starts must increase, got {start} after {out[-1][0]}")
        unknown = [t for t, w in weights.items() if w > 0 and t not in tasks]
        if unknown:
            raise ValueError(f"{name}: tasks {unknown} have no train_shards (configured: {list(tasks)})")
        p = normalized(weights, name)
        out.append((start, {t: w for t, w in p.items() if w > 0}))
    if out[0][0] != 0:
        raise ValueError(f"mixture schedule must start at batch 0, its first entry starts at {out[0][0]}")
    return out


def entry_at(schedule: Schedule, index: int) -> tuple[int, Weights]:
    """(start, weights) of the entry that draws batch `index`."""
    i = bisect.bisect_right([s for s, _ in schedule], index) - 1
    return schedule[max(i, 0)]


class MixtureState:
    """The schedule and the current iterator's start `(epoch, batch in epoch)` in shared memory, guarded by a
    sequence lock: the writer makes `version` odd while it writes, even when done; a reader retries until it
    sees the same even version before and after reading.

    Layout (float64): [version, start_epoch, start_batch, n, then n x (start, w_0 .. w_{T-1})].
    """

    HEADER = 4

    def __init__(self, tasks: Sequence[str], schedule: Schedule):
        self.tasks = tuple(tasks)
        self._width = 1 + len(self.tasks)
        self._buf = torch.zeros(self.HEADER + MAX_ENTRIES * self._width, dtype=torch.float64).share_memory_()
        self._view = self._buf.numpy()  # same memory; reading numpy is ~100x cheaper than tensor indexing
        self.set_schedule(schedule)

    def __getstate__(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "_buf": self._buf}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.tasks, self._buf = state["tasks"], state["_buf"]
        self._width = 1 + len(self.tasks)
        self._view = self._buf.numpy()

    def _write(self, values: dict[int, float]) -> None:
        self._view[0] += 1
        for i, v in values.items():
            self._view[i] = v
        self._view[0] += 1

    def _read(self, lo: int, hi: int | None = None) -> list[float]:
        while True:
            v1 = self._view[0]
            if v1 % 2:
                continue
            n = int(self._view[3])
            values = self._view[lo:(self.HEADER + n * self._width) if hi is None else hi].tolist()
            if self._view[0] == v1:
                return values

    def set_schedule(self, schedule: Schedule) -> None:
        """`schedule` must be checked (`check_schedule`)."""
        values: dict[int, float] = {3: float(len(schedule))}
        for j, (start, weights) in enumerate(schedule):
            row = self.HEADER + j * self._width
            values[row] = float(start)
            for i, t in enumerate(self.tasks):
                values[row + 1 + i] = float(weights.get(t, 0.0))
        self._write(values)

    def schedule(self) -> Schedule:
        flat = self._read(self.HEADER)
        rows = [flat[j:j + self._width] for j in range(0, len(flat), self._width)]
        return [(int(r[0]), {t: w for t, w in zip(self.tasks, r[1:]) if w > 0}) for r in rows]

    def set_start(self, epoch: int, batch: int) -> None:
        self._write({1: float(epoch), 2: float(batch)})

    def start(self) -> tuple[int, int]:
        epoch, batch = self._read(1, 3)
        return int(epoch), int(batch)
