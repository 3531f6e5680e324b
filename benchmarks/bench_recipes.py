"""Conversion throughput of the data recipes on generated fixtures, to estimate a full conversion.

Subjects200K decodes each 1056 x 528 composite and re-encodes its two 512 crops (CPU-bound); OmniEdit copies
image bytes through (I/O-bound). Fixture images carry photo-like grain, so their JPEGs are about the size of
real photographs'. The full-release estimate uses rows/s for Subjects200K and input MB/s for OmniEdit (its
rows hold ~2.4 MB of images, more than these fixtures). One process; `--workers N` scales about linearly on
N cores, shards being independent.

    python benchmarks/bench_recipes.py [--rows 200]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cologen.testing import recipe_fixtures as F
from data_recipes._editing import EditingConverter
from data_recipes._sources import ParquetSource
from data_recipes._writer import Job, run
from data_recipes.omniedit import COLUMNS as OMNIEDIT_COLUMNS
from data_recipes.subjects200k import Subjects200KConverter

NOISE = 10.0  # grey-level grain of the fixture images
FULL_ROWS = {"subjects200k": 206_841}  # rows of the public release
FULL_BYTES = {"omniedit": 2_852_916_299_223}  # train split bytes of the public release


def _measure(name: str, parquet: Path, convert, out: Path) -> dict[str, float]:
    source = ParquetSource([parquet])
    t0 = time.perf_counter()
    summary = run(Job(source, convert, out, prefix=name, shard_size=100), progress=False)
    seconds = time.perf_counter() - t0
    rows_per_s = summary.rows_read / seconds
    bytes_per_s = parquet.stat().st_size / seconds
    full = FULL_ROWS[name] / rows_per_s if name in FULL_ROWS else FULL_BYTES[name] / bytes_per_s
    return {"rows": summary.rows_read, "samples": summary.samples, "seconds": round(seconds, 3),
            "rows_per_s": round(rows_per_s, 1), "input_kb_per_row": round(parquet.stat().st_size / 1e3 / summary.rows_read, 1),
            "input_mb_per_s": round(bytes_per_s / 1e6, 1),
            "full_release_hours_one_process": round(full / 3600, 2)}


def conversion_throughput(rows: int = 200) -> dict[str, dict[str, float]]:
    """Rows per second of `subjects200k` and `omniedit` on `rows`-row fixtures (generated, then timed)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        s200k = F.write_parquet(F.subjects200k_table(rows, noise=NOISE, distinct=16), root / "s200k.parquet", row_group_size=50)
        omni = F.write_parquet(F.omniedit_table(rows, size=(768, 512), noise=NOISE, distinct=16), root / "omni.parquet",
                               row_group_size=50)
        return {
            "subjects200k": _measure("subjects200k", s200k, Subjects200KConverter(), root / "out_s200k"),
            "omniedit": _measure("omniedit", omni, EditingConverter(OMNIEDIT_COLUMNS), root / "out_omni"),
        }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200)
    print(json.dumps(conversion_throughput(p.parse_args().rows), indent=1))
