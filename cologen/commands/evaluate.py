"""`cologen eval CKPT`: score a checkpoint (or the base alone) on ShapeWorld probes, per task, with 95% confidence
intervals, with the routers' choice and with oracle routing.

    cologen eval runs/tiny/stage3/last.ckpt --probes 64 --oracle --out runs/tiny/stage3/eval
    cologen eval --base --config experiments/tiny/curriculum.yaml --out runs/tiny/base_only   # the base, no expert

`--config` takes a training config whose `data.init_args.builder` the probes are built with (box thickness,
overlay kinds...), so a score compares with that run's validation probe for probe.

Writes `scores.jsonl` (one line per probe and routing mode) and `metrics.json` (means with intervals) to `--out`
and prints the table. Probes are the first N validation examples of each task (the same ones SampleValidation
uses), each with its own noise seed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from cologen import checkpoints
from cologen.data.tasks import CURRICULUM_TASKS
from cologen.errors import MissingInput, UsageError

DEFAULT_DATA = "data/shapeworld"


def load_module(checkpoint: str | None):
    """A CoLoGenModule from a checkpoint, or the tiny preset's base with its (zero-initialised) first expert."""
    from cologen.module import CoLoGenModule

    if checkpoint is None:
        return CoLoGenModule()
    checkpoints.verify(checkpoint)
    return CoLoGenModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=False)


def builder_from_config(path: str | None) -> dict:
    """`data.init_args.builder` of a training config (YAML), or {} for the defaults."""
    if path is None:
        return {}
    from omegaconf import OmegaConf

    if not Path(path).is_file():
        raise MissingInput(f"config {path} does not exist")
    data = OmegaConf.to_container(OmegaConf.load(path)).get("data") or {}
    return dict((data.get("init_args") or {}).get("builder") or {})


def load_probes(data: str, tasks: list[str], n: int, seed: int = 0, builder: dict | None = None):
    """The first `n` validation examples of each task, built as the curriculum's validation builds them."""
    from cologen.data.builders import BuilderConfig
    from cologen.data.datamodule import MixtureDataModule
    from cologen.eval.probes import probes_from_batch

    root = Path(data)
    missing = [t for t in tasks if not list((root / t).glob("val-*.tar"))]
    if missing:
        raise MissingInput(f"no validation shards for {missing} under {root}: run `make data` (ShapeWorld) or "
                                "pass --data")
    shards = {t: str(root / t / "val-*.tar") for t in tasks}
    dm = MixtureDataModule(train_shards=shards, val_shards=shards, mixture={tasks[0]: 1.0}, num_workers=0,
                           val_samples_per_task=n, val_tasks=tasks, seed=seed,
                           builder=BuilderConfig(**(builder or {})))
    probes = {}
    for task, ds in dm.val_datasets().items():
        probes[task] = [p for i in range(len(ds)) for p in probes_from_batch(ds[i], n)][:n]
    return probes


def evaluate(module, probes: dict, *, steps: int = 16, seed: int = 0, oracle: bool = False) -> list[dict]:
    """Per-probe score lines (`task`, `index`, `key`, `routing`, `{task}/{metric}`...) for every task."""
    from cologen.eval.probes import own_expert_share, run_probes

    module.eval()
    modes = [False, True] if oracle and module.model.num_active > 1 else [False]
    lines = []
    for task, task_probes in probes.items():
        for forced in modes:
            run = run_probes(module, task, task_probes, seed=seed, oracle=forced, steps=steps)
            own = module.task_experts.get(task)
            share = own_expert_share(run.routing, own) if own is not None and not forced else float("nan")
            for i, (p, row) in enumerate(zip(task_probes, run.rows)):
                lines.append({"task": task, "index": i, "key": p["key"], "routing": "oracle" if forced else "learned",
                              "own_expert": share, **row})
    return lines


def summarize(lines: list[dict]) -> dict[str, dict]:
    """`{routing}/{task}/{metric}` -> mean and 95% interval (bootstrap over probes)."""
    from cologen.metrics.stats import bootstrap_ci

    groups: dict[str, list[float]] = {}
    for line in lines:
        for key, value in line.items():
            if "/" in key and isinstance(value, (int, float)):
                groups.setdefault(f"{line['routing']}/{key}", []).append(float(value))
    return {k: bootstrap_ci([v]).as_dict() for k, v in sorted(groups.items())}


def _clean(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cologen eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", help="a cologen checkpoint (omit with --base)")
    parser.add_argument("--base", action="store_true", help="evaluate the tiny base alone (no expert)")
    parser.add_argument("--data", default=DEFAULT_DATA, help="ShapeWorld folder (default: %(default)s)")
    parser.add_argument("--tasks", nargs="+", default=list(CURRICULUM_TASKS), choices=CURRICULUM_TASKS)
    parser.add_argument("--probes", type=int, default=64, help="probes per task (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=16, help="sampler steps (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--oracle", action="store_true", help="also score with oracle routing")
    parser.add_argument("--config", help="training config whose data.init_args.builder builds the probes")
    parser.add_argument("--out", help="folder for scores.jsonl and metrics.json")
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (not args.base):
        parser.error("give a checkpoint or --base (not both)")
    try:
        if args.checkpoint is not None:
            checkpoints.check(args.checkpoint)  # both checks before the model is built: fail fast
        probes = load_probes(args.data, args.tasks, args.probes, args.seed, builder_from_config(args.config))
        module = load_module(args.checkpoint)
    except UsageError as err:
        print(f"cologen eval: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    lines = evaluate(module, probes, steps=args.steps, seed=args.seed, oracle=args.oracle)
    table = summarize(lines)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "scores.jsonl", "w") as f:
            for line in lines:
                f.write(json.dumps({k: _clean(v) for k, v in line.items()}) + "\n")
        (out / "metrics.json").write_text(json.dumps({k: {m: _clean(x) for m, x in v.items()}
                                                      for k, v in table.items()}, indent=1) + "\n")
    width = max(len(k) for k in table) if table else 0
    for key, est in table.items():
        print(f"{key:<{width}}  {est['mean']:.3f}  [{est['low']:.3f}, {est['high']:.3f}]  n={est['n']}")
