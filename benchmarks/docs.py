"""`make bench-docs`: the CPU benchmark figures of the README, docs/data.md and docs/logging.md, from one results
file of `make bench`.

    python -m benchmarks.docs [--results runs/bench/results.json]   # copy the results in, rewrite the docs
    python -m benchmarks.docs --check                                # exit 1 if a doc disagrees with the file

The committed copy is `docs/results/bench_cpu.json`; its date, machine and load are printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from benchmarks.goals import rows
from cologen.docgen import stale, update

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "docs" / "results" / "bench_cpu.json"
COMMAND = "make bench && make bench-docs"
DOCS = {"README.md": ["bench.cpu"], "docs/data.md": ["bench.loader"], "docs/logging.md": ["bench.validation"],
        "docs/multi_condition.md": ["bench.conditions"]}


def provenance(results: dict[str, Any]) -> str:
    m = results["machine"]
    load = m.get("load_average_at_start")
    end = m.get("load_average_at_end")
    loads = f"; load average {load[0]:.1f} at the start, {end[0]:.1f} at the end" if load and end else ""
    return (f"`make bench` on {m['date']}, {m.get('cpu', 'unknown CPU')} ({m['cpu_count']} cores), "
            f"torch {m['torch']}{loads} (`docs/results/bench_cpu.json`)")


def cpu_table(results: dict[str, Any] | None) -> str:
    if results is None:
        return f"No `make bench` results are committed for this revision yet: `{COMMAND}` measures and writes them."
    lines = [f"Measured with {provenance(results)}; ratios against a baseline in the same process:", "",
             "| what | measured | goal | verdict |", "|---|---|---|---|"]
    lines += [f"| {r.what} | {r.measured} | {r.goal or '-'} | {r.verdict} |" for r in rows(results)]
    return "\n".join(lines)


def loader_paragraph(results: dict[str, Any] | None) -> str:
    head = ("**Throughput.** `benchmarks/bench_loader.py` (`loader_throughput(...) -> dict`, or run it) times the "
            "training loader on the default ShapeWorld (all seven tasks mixed, 2 workers, batch 8)")
    data = (results or {}).get("data")
    if not data:
        return head + f"; `{COMMAND}` writes its figures here."
    loader, train = data["loader"], data["training"]
    return (f"{head}: {loader['samples_per_s']:.0f} samples/s, against {train['samples_per_s']:.1f} samples/s that "
            f"the tiny model of `experiments/tiny/curriculum.yaml` consumes ({train['step_s']:.3f} s per batch of "
            f"8): the loader is {data['ratio']:.1f}x faster than training needs (goal: 5x). Workers start in about "
            f"{loader['startup_s']:.1f} s. Measured with {provenance(results)}.")


def validation_cost(results: dict[str, Any] | None) -> str:
    head = ("- Cost: sampling a task is `steps + 1` forward passes of a `probes_per_task` batch (the source stream "
            "once per timestep bin), plus the metrics")
    v = (results or {}).get("validation")
    if not v:
        return head + f"; `{COMMAND}` measures it on the tiny preset."
    per_task = v["seconds_per_task"]
    mean = sum(per_task.values()) / len(per_task)
    spread = f"{min(per_task.values()):.1f}-{max(per_task.values()):.1f} s per task"
    return (f"{head}. On the tiny preset ({v['probes']} probes, {v['steps']} steps) one task takes {mean:.1f} s "
            f"({spread}), as long as {mean / v['train_step_s']:.0f} training steps ({v['train_step_s']:.2f} s "
            f"each); the validation closing the curriculum samples all {len(per_task)} tasks and, with oracle "
            f"routing, samples them again: about {2 * sum(per_task.values()):.0f} s. That is why the tiny preset "
            f"samples only what its tables need (`scope: curriculum`). Measured with {provenance(results)}.")


def conditions_tables(results: dict[str, Any] | None) -> str:
    c = (results or {}).get("conditions")
    if not c:
        return f"`{COMMAND}` measures what each added condition costs (`benchmarks/bench_conditions.py`) and writes it here."
    counts = sorted(c["speed"][0]["train_ratio"], key=int)
    lines = [f"Measured with {provenance(results)}; every condition has as many tokens as the target; ratios to "
             "one condition, variants interleaved in one process, medians:", "",
             "| config | " + " | ".join(f"training, K={k} (tokens)" for k in counts) + " | "
             + " | ".join(f"denoising step, K={k}" for k in counts) + " |",
             "|---|" + "---|" * (2 * len(counts))]
    for r in c["speed"]:
        lines.append(f"| {r['config']} | " + " | ".join(f"{r['train_ratio'][k]:.2f}x ({r['token_ratio'][k]:.2f}x)"
                                                        for k in counts)
                     + " | " + " | ".join(f"{r['denoise_ratio'][k]:.2f}x" for k in counts) + " |")
    memory = c.get("memory")
    if memory:
        lines += ["", "FLUX.1-dev, 512 px target and K 512 px conditions, batch 1, computed by the memory plan "
                  "(benchmarks/memory.py's method):", "",
                  "| K | activations | with checkpointing | with the persistent weights and states |", "|---|---|---|---|"]
        lines += [f"| {k} | {m['activations_gb']:.1f} GB | {m['activations_checkpointed_gb']:.1f} GB | "
                  f"{m['total_checkpointed_gb']:.1f} GB |" for k, m in sorted(memory.items(), key=lambda x: int(x[0]))]
    return "\n".join(lines)


def sections(results: dict[str, Any] | None) -> dict[str, dict[str, str]]:
    """doc -> {section name: text}."""
    return {"README.md": {"bench.cpu": cpu_table(results)},
            "docs/data.md": {"bench.loader": loader_paragraph(results)},
            "docs/logging.md": {"bench.validation": validation_cost(results)},
            "docs/multi_condition.md": {"bench.conditions": conditions_tables(results)}}


def load(path: Path = RESULTS) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", help="a `make bench` results file to copy to docs/results/bench_cpu.json")
    parser.add_argument("--check", action="store_true", help="exit 1 if a doc disagrees with the committed results")
    args = parser.parse_args(argv)
    if args.results and not args.check:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.results, RESULTS)
    bad = 0
    for doc, texts in sections(load()).items():
        names = stale(ROOT / doc, texts) if args.check else update(ROOT / doc, texts)
        if names:
            bad += 1
            print(f"{doc}: {'stale: ' if args.check else 'rewrote '}{', '.join(names)}")
    if args.check and bad:
        print(f"run `{COMMAND}` (or `python -m benchmarks.docs` to re-render the committed results)")
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
