"""Loader throughput: samples per second that `MixtureDataModule` delivers (tiny preset, all tasks mixed), and what
the shard manifest check costs of it.

    python -m benchmarks.bench_loader [--data DIR] [--workers 2] [--batches 400] [--manifest-repeats 3]

Compare with the tiny model's training consumption (samples/s); the goal is loader >= 5x that. The manifest check
(`cologen/data/reader.py`: each shard's manifest read once per process, its sample count compared at the shard's
end) is timed as the same loader over the same shards with and without their manifests (symlinks in a temporary
folder), runs interleaved, medians compared; the goal is < 5% of the loader's throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cologen.data.datamodule import MixtureDataModule
from cologen.data.shards import expand_shards
from data_recipes.shapeworld import ensure_shapeworld, shard_patterns


def loader_throughput(data_dir: str | os.PathLike = "data/shapeworld", num_workers: int = 2, batch_size: int = 8,
                      batches: int = 400, warmup_batches: int = 50, resolution: int = 32, seed: int = 0,
                      mixture: dict[str, float] | None = None,
                      shards: dict[str, Any] | None = None) -> dict[str, Any]:
    """Time `batches` batches after `warmup_batches` (worker start-up and shuffle-buffer filling).

    Generates the default ShapeWorld dataset into `data_dir` first if it is not there; `shards` replaces its
    train shards (per task).
    """
    ensure_shapeworld(data_dir, progress=False)
    train = shards or shard_patterns(data_dir, "train")
    mixture = mixture or {t: 1.0 for t in train}
    dm = MixtureDataModule(train, mixture, batch_size=batch_size, num_workers=num_workers, resolution=resolution,
                           seed=seed, batches_per_epoch=warmup_batches + batches)
    started = time.perf_counter()
    it = iter(dm.train_dataloader())
    for _ in range(warmup_batches):
        next(it)
    warm = time.perf_counter()
    samples = 0
    for _ in range(batches):
        samples += len(next(it)["key"])
    elapsed = time.perf_counter() - warm
    del it
    return {
        "samples_per_s": round(samples / elapsed, 1),
        "batches_per_s": round(batches / elapsed, 2),
        "num_workers": num_workers,
        "batch_size": batch_size,
        "resolution": resolution,
        "startup_s": round(warm - started, 2),
        "measured_batches": batches,
        "bad_samples": dm.bad_sample_count,
        "mixture": dm.mixture,
    }


def manifest_check_cost(data_dir: str | os.PathLike = "data/shapeworld", repeats: int = 3,
                        **kwargs: Any) -> dict[str, Any]:
    """The loader's throughput with and without shard manifests (interleaved runs, medians) and the check's share."""
    ensure_shapeworld(data_dir, progress=False)
    train = shard_patterns(data_dir, "train")
    with_manifests, without = [], []
    with tempfile.TemporaryDirectory() as tmp:
        links: dict[str, str] = {}  # the same tars, without manifests beside them
        for url in {u for pattern in train.values() for u in expand_shards(pattern)}:
            link = Path(tmp) / Path(url).parent.name / Path(url).name
            link.parent.mkdir(exist_ok=True)
            link.symlink_to(Path(url).resolve())
            links[url] = str(link)
        bare = {task: [links[u] for u in expand_shards(pattern)] for task, pattern in train.items()}
        for _ in range(repeats):
            with_manifests.append(loader_throughput(data_dir, shards=train, **kwargs)["samples_per_s"])
            without.append(loader_throughput(data_dir, shards=bare, **kwargs)["samples_per_s"])
    a, b = statistics.median(with_manifests), statistics.median(without)
    return {"with_manifests_samples_per_s": a, "without_samples_per_s": b, "cost": round(1 - a / b, 4),
            "runs_with": with_manifests, "runs_without": without}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/shapeworld")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--manifest-repeats", type=int, default=0, help="also time the manifest check (this many pairs)")
    args = ap.parse_args(argv)
    result = loader_throughput(args.data, args.workers, args.batch_size, args.batches, args.warmup)
    if args.manifest_repeats:
        result["manifest_check"] = manifest_check_cost(args.data, args.manifest_repeats, num_workers=args.workers,
                                                       batch_size=args.batch_size, batches=args.batches,
                                                       warmup_batches=args.warmup)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
