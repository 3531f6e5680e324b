"""Row-level types every converter shares: a sample, the skip exception, the row source and the per-row context.

A recipe is a row source (`data_recipes._sources`) and a function `convert(row, ctx) -> samples`;
`data_recipes._writer.run()` turns them into shards. Also the small text and score helpers of converters.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


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
