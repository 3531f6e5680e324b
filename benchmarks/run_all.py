"""`make bench`: every CPU benchmark of the project, each a ratio against a baseline measured in the same process.

1. training step: backbone / one always-on LoRA / PRW (5 experts + router), tiny and wide configs (goal PRW/LoRA <= 1.10)
2. data: loader throughput (2 workers) over the tiny model's training consumption (goal >= 5x), and the shard
   manifest check's share of the loader's throughput (goal < 5%)
3. sampler: 28 steps with and without the condition cache (goal >= 1.8x on the wide config)
4. recipes: conversion rows/s for subjects200k and omniedit on fixtures

Results are printed and written to `runs/bench/results.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_loader, bench_model, bench_recipes, bench_sampler  # noqa: E402


def training_consumption(data_dir: str, steps: int = 20, batch_size: int = 8) -> dict:
    """Samples per second the tiny preset's real training step consumes (text encoding cached, as in training)."""
    from cologen.data.datamodule import MixtureDataModule
    from cologen.model.presets import TINY_BASE_DIR, TinyPreset
    from cologen.module import CoLoGenModule
    from data_recipes.shapeworld import shard_patterns

    base = "builtin" if (TINY_BASE_DIR / "model.safetensors").is_file() else None
    module = CoLoGenModule(preset=TinyPreset(base=base)).train()
    optimizer = module.configure_optimizers()["optimizer"]
    tasks = ["inpainting", "grounding", "control", "customized", "editing"]
    dm = MixtureDataModule(train_shards={t: p for t, p in shard_patterns(data_dir).items() if t in tasks},
                           mixture={t: 1.0 for t in tasks}, batch_size=batch_size, num_workers=0,
                           batches_per_epoch=steps + 5)
    batches = list(iter(dm.train_dataloader()))
    times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        loss = module.compute_losses(batch, train=True)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= 5:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return {"step_s": step, "samples_per_s": batch_size / step}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="data/shapeworld")
    parser.add_argument("--out", default="runs/bench/results.json")
    parser.add_argument("--skip", nargs="*", default=[], choices=["model", "data", "sampler", "recipes"])
    args = parser.parse_args(argv)
    results: dict = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                 "torch": torch.__version__, "threads": torch.get_num_threads()}}
    if "model" not in args.skip:
        results["model"] = bench_model.main([])
    if "data" not in args.skip:
        loader = bench_loader.loader_throughput(args.data, num_workers=2)
        train = training_consumption(args.data)
        ratio = loader["samples_per_s"] / train["samples_per_s"]
        manifests = bench_loader.manifest_check_cost(args.data, repeats=3, num_workers=2)
        results["data"] = {"loader": loader, "training": train, "ratio": ratio, "manifest_check": manifests}
        print(f"[data] loader {loader['samples_per_s']:.0f} samples/s (2 workers) vs training "
              f"{train['samples_per_s']:.1f} samples/s ({train['step_s']:.3f} s/step, batch 8)  |  "
              f"ratio {ratio:.1f}x (goal >= 5x)")
        print(f"[data] manifest check: {100 * manifests['cost']:.1f}% of the loader's throughput "
              f"({manifests['with_manifests_samples_per_s']:.0f} vs {manifests['without_samples_per_s']:.0f} samples/s "
              f"without manifests, medians of 3 interleaved runs; goal < 5%)")
    if "sampler" not in args.skip:
        results["sampler"] = bench_sampler.main([])
    if "recipes" not in args.skip:
        rec = bench_recipes.conversion_throughput()
        results["recipes"] = rec
        for name, r in rec.items():
            print(f"[recipes/{name}] {r['rows_per_s']:.0f} rows/s on fixtures (about "
                  f"{r['full_release_hours_one_process']} h for the full release in one process)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"results written to {out}")
    return results


if __name__ == "__main__":
    main()
