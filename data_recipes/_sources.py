"""Row sources: the public releases as distributed, read lazily and resumable at any row index.

* `ParquetSource`: Hugging Face parquet shards, read in row batches (never a whole file at once); a start row
  is reached through the footer metadata, skipping whole files and row groups without reading them.
* `ListSource`: rows already in memory (COCO-style JSON indexes, benchmark prompt lists).
* `TarSource`: existing webdataset tars; one row = one sample (members grouped by key).
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq


class ParquetSource:
    def __init__(self, paths: Sequence[Path], columns: Sequence[str] | None = None, batch_size: int = 16):
        self.paths = list(paths)
        self.batch_size = batch_size
        self._files: list[pq.ParquetFile] | None = None
        schema = pq.read_schema(self.paths[0])
        # Optional columns (e.g. UltraEdit's mask_image) may be absent: read only what exists.
        self.columns = None if columns is None else [c for c in columns if c in schema.names]
        self.schema_names = list(schema.names)

    def _open(self) -> list[pq.ParquetFile]:
        if self._files is None:  # opened lazily, so forked workers each get their own handles
            self._files = [pq.ParquetFile(p) for p in self.paths]
        return self._files

    def num_rows(self) -> int:
        return sum(pq.read_metadata(p).num_rows for p in self.paths)

    def iter_rows(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
        offset = 0  # global index of the first row of the current row group
        for pf in self._open():
            meta = pf.metadata
            for rg in range(meta.num_row_groups):
                n = meta.row_group(rg).num_rows
                lo, hi = offset, offset + n
                offset = hi
                if hi <= start:
                    continue
                if stop is not None and lo >= stop:
                    return
                index = lo
                for batch in pf.iter_batches(batch_size=self.batch_size, row_groups=[rg], columns=self.columns):
                    b_lo, b_hi = index, index + batch.num_rows
                    index = b_hi
                    if b_hi <= start:
                        continue
                    first = max(start - b_lo, 0)
                    last = batch.num_rows if stop is None else min(stop - b_lo, batch.num_rows)
                    if last <= first:
                        break
                    for j, row in enumerate(batch.slice(first, last - first).to_pylist()):
                        yield b_lo + first + j, row
                    if stop is not None and b_hi >= stop:
                        return


class ListSource:
    def __init__(self, rows: Sequence[dict[str, Any]]):
        self.rows = rows

    def num_rows(self) -> int:
        return len(self.rows)

    def iter_rows(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
        stop = len(self.rows) if stop is None else min(stop, len(self.rows))
        for i in range(start, stop):
            yield i, self.rows[i]


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the base name; the rest is the field."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


class TarSource:
    """Samples of webdataset tars, as dicts `{field: bytes, "__key__": ..., "__url__": ...}`.

    Counting rows reads only tar headers (data is seeked over), so a resumed run starts quickly.
    """

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)
        self._counts: list[int] | None = None

    def _keys(self, path: Path) -> Iterator[tuple[str, tarfile.TarInfo]]:
        with tarfile.open(path, "r:") as tf:
            for info in tf:
                if info.isfile():
                    key, _ = _split_member(info.name)
                    yield key, info

    def counts(self) -> list[int]:
        if self._counts is None:
            counts = []
            for path in self.paths:
                n, last = 0, None
                for key, _ in self._keys(path):
                    if key != last:
                        n, last = n + 1, key
                counts.append(n)
            self._counts = counts
        return self._counts

    def num_rows(self) -> int:
        return sum(self.counts())

    def iter_rows(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
        offset = 0
        for path, count in zip(self.paths, self.counts()):
            lo, hi = offset, offset + count
            offset = hi
            if hi <= start:
                continue
            if stop is not None and lo >= stop:
                return
            index = lo - 1
            sample: dict[str, Any] | None = None
            with tarfile.open(path, "r:") as tf:
                for info in tf:
                    if not info.isfile():
                        continue
                    key, fld = _split_member(info.name)
                    if sample is None or key != sample["__key__"]:
                        if sample is not None and index >= start:
                            yield index, sample
                        index += 1
                        if stop is not None and index >= stop:
                            return
                        sample = {"__key__": key, "__url__": str(path)}
                    if index >= start:  # rows before the start are skipped without reading their data
                        f = tf.extractfile(info)
                        sample[fld] = f.read() if f is not None else b""
                if sample is not None and index >= start:
                    yield index, sample
