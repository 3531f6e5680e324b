"""`make bench`: every CPU benchmark of the project, each a ratio against a baseline measured in the same process.

1. training step: backbone / one always-on LoRA / PRW (5 experts + router), tiny and wide configs (goal PRW/LoRA <= 1.10)
   and what the prompt's gate terms cost when every expert holds them at zero (skipped; goal <= 1.02) and computed
2. data: loader throughput (2 workers) over what training of the configured tiny model consumes (goal >= 5x), and
   the shard manifest check's share of the loader's throughput (goal < 5%)
3. sampler: 28 steps with and without the condition cache (goal >= 1.8x on the wide config)
4. recipes: conversion rows/s for subjects200k and omniedit on fixtures
5. validation: one task's sampling validation (the tiny curriculum's probes and steps) against one training step

Results (with the date, the machine and its load) are written to `runs/bench/results.json`; a verdict per row
(met / NOT MET / no goal) ends the printout. `make bench-docs` copies the results into `docs/results/bench_cpu.json`
and rewrites the tables of the README, docs/data.md and docs/logging.md from it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

from benchmarks import (
    bench_conditions,
    bench_gates,
    bench_loader,
    bench_model,
    bench_recipes,
    bench_sampler,
    bench_validation,
)
from benchmarks.goals import print_verdicts
from cologen.machine import describe

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"date": datetime.date.today().isoformat(), **describe(), "platform": platform.platform(),
            "load_average_at_start": [round(x, 2) for x in load] if load else None}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="data/shapeworld")
    parser.add_argument("--out", default="runs/bench/results.json")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["model", "gates", "data", "sampler", "recipes", "validation", "conditions"])
    args = parser.parse_args(argv)
    results: dict = {"machine": machine()}
    train_step_s = None
    if "model" not in args.skip:
        results["model"] = bench_model.main([])
    if "gates" not in args.skip:
        results["gates"] = bench_gates.main([])
    if "data" not in args.skip:
        loader = bench_loader.loader_throughput(args.data, num_workers=2)
        train_step_s = bench_validation.training_step_s(args.data)
        train = {"step_s": train_step_s, "samples_per_s": 8 / train_step_s}
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
    if "conditions" not in args.skip:
        results["conditions"] = bench_conditions.main(["--memory"])
    if "recipes" not in args.skip:
        rec = bench_recipes.conversion_throughput()
        results["recipes"] = rec
        for name, r in rec.items():
            print(f"[recipes/{name}] {r['rows_per_s']:.0f} rows/s on fixtures (about "
                  f"{r['full_release_hours_one_process']} h for the full release in one process)")
    if "validation" not in args.skip:
        train_step_s = train_step_s or bench_validation.training_step_s(args.data)
        results["validation"] = v = bench_validation.validation_cost(args.data, bench_validation.TASKS, train_step_s)
        print(f"[validation] one task's sampling ({v['probes']} probes, {v['steps']} steps): "
              f"{v['seconds_per_task']} s vs a training step of {train_step_s:.3f} s")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in load] if load else None
    print_verdicts(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"results written to {out}")
    return results


if __name__ == "__main__":
    main()
