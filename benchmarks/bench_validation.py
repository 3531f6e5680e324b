"""The cost of a sampling validation on the tiny preset: sampling one task's probes (as `SampleValidation` does
with the settings of experiments/tiny/curriculum.yaml) against one training step of the same model.

    python -m benchmarks.bench_validation [--data data/shapeworld] [--tasks inpainting control]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CURRICULUM = ROOT / "experiments" / "tiny" / "curriculum.yaml"
TASKS = ["inpainting", "grounding", "control", "customized", "editing"]


def tiny_module():
    """The tiny preset's module exactly as experiments/tiny/curriculum.yaml configures it, every expert active."""
    from cologen.module import CoLoGenModule

    config = yaml.safe_load(CURRICULUM.read_text())["model"]
    module = CoLoGenModule(**config)
    while module.model.num_active < module.prw_config.num_experts:
        module.model.activate_next_expert()
    module.model.set_entry_progress(1.0)
    return module


def sampling_settings() -> dict:
    callbacks = yaml.safe_load(CURRICULUM.read_text())["trainer"]["callbacks"]
    sv = next(c["init_args"] for c in callbacks if c["class_path"].endswith("SampleValidation"))
    return {"probes": sv["probes_per_task"], "steps": sv["steps"]}


def validation_cost(data: str, tasks: list[str], train_step_s: float) -> dict:
    from cologen.commands.evaluate import load_probes
    from cologen.eval.probes import run_probes

    settings = sampling_settings()
    module = tiny_module().eval()
    probes = load_probes(data, tasks, settings["probes"])
    seconds = {}
    for task in tasks:
        with torch.no_grad():
            start = time.perf_counter()
            run_probes(module, task, probes[task], seed=0, steps=settings["steps"])
            seconds[task] = round(time.perf_counter() - start, 2)
    return {**settings, "seconds_per_task": seconds, "train_step_s": round(train_step_s, 4)}


def training_step_s(data: str, steps: int = 20, batch_size: int = 8) -> float:
    """Median seconds of a training step of the configured tiny module (text encoding cached, as in training)."""
    from cologen.data.datamodule import MixtureDataModule
    from data_recipes.shapeworld import shard_patterns

    module = tiny_module().train()
    optimizer = module.configure_optimizers()["optimizer"]
    dm = MixtureDataModule(train_shards={t: p for t, p in shard_patterns(data).items() if t in TASKS},
                           mixture={t: 1.0 for t in TASKS}, batch_size=batch_size, num_workers=0,
                           batches_per_epoch=steps + 5)
    times = []
    for i, batch in enumerate(iter(dm.train_dataloader())):
        t0 = time.perf_counter()
        loss = module.compute_losses(batch, train=True)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= 5:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/shapeworld")
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    args = parser.parse_args(argv)
    result = validation_cost(args.data, args.tasks, training_step_s(args.data))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
