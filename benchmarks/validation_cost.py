"""What the flux_dev runs' validation costs, as a share of training time, computed from the H200 figures in
docs/benchmarks.md (the training step at the configs' batch with checkpointing, the 28-step sampler with the
condition cache) and the stage configs (cadence, tasks, probes, validation examples):

    python -m benchmarks.validation_cost

One GPU is the worst case: with N GPUs the probes and the validation batches are spread over the ranks while a
training step takes as long. A validation forward pass is taken as a third of a training step without
checkpointing (forward + backward of the trainable path; the frozen base's backward is cheaper, so this is high).
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_DOC = ROOT / "docs" / "benchmarks.md"
FLUX_DEV = ROOT / "experiments" / "flux_dev"


@dataclass
class GpuFigures:
    step_seconds: dict[tuple[int, bool], float]  # (batch, checkpointing) -> seconds per training step
    sampler_seconds: float  # 28 steps, batch 1, condition cache on
    sampler_steps: int


def read_gpu_figures(doc: Path = BENCHMARKS_DOC) -> GpuFigures:
    """The measured rows of docs/benchmarks.md's GPU results listing (`python -m benchmarks.bench_gpu`'s output)."""
    blocks = re.findall(r"```text\n(.*?)```", doc.read_text(), flags=re.S)
    text = next((b for b in blocks if "[bench-gpu] device NVIDIA" in b), "")
    rows = re.findall(r"^\s+(\d+)\s+(on|off)\s+([\d.]+)\s", text, flags=re.M)
    sampler = re.search(r"sampler (\d+) steps, batch 1: cache on ([\d.]+) s", text)
    if not rows or sampler is None:
        raise ValueError(f"{doc}: no bench_gpu results listing (step rows and the sampler line)")
    steps = {(int(b), c == "on"): float(s) for b, c, s in rows}
    return GpuFigures(steps, float(sampler.group(2)), int(sampler.group(1)))


def _layered(*paths: Path) -> dict:
    """The configs merged the way LightningCLI layers them (later files win, dicts merge, lists are replaced)."""
    merged = OmegaConf.merge(*(OmegaConf.load(path) for path in paths))
    return OmegaConf.to_container(merged, resolve=False)


@dataclass
class StageCost:
    stage: int
    tasks: int
    train_seconds: float  # between two validations
    sample_seconds: float
    loss_seconds: float

    @property
    def share(self) -> float:
        return (self.sample_seconds + self.loss_seconds) / self.train_seconds


def stage_cost(stage: int, gpu: GpuFigures, folder: Path = FLUX_DEV) -> StageCost:
    config = _layered(folder / "curriculum.yaml", folder / f"data_stage{stage}.yaml", folder / f"stage{stage}.yaml")
    trainer, data = config["trainer"], config["data"]["init_args"]
    sampling = next(c["init_args"] for c in trainer["callbacks"] if c["class_path"].endswith("SampleValidation"))
    batch, checkpointing = data["batch_size"], config["model"].get("gradient_checkpointing", False)
    tasks = len(data["val_shards"])
    train = trainer["val_check_interval"] * gpu.step_seconds[(batch, checkpointing)]
    sample = tasks * sampling["probes_per_task"] * gpu.sampler_seconds * sampling["steps"] / gpu.sampler_steps
    loss = tasks * math.ceil(data["val_samples_per_task"] / batch) * gpu.step_seconds[(batch, False)] / 3
    return StageCost(stage, tasks, train, sample, loss)


def main(argv: list[str] | None = None) -> list[StageCost]:
    argparse.ArgumentParser(prog="python -m benchmarks.validation_cost", description=__doc__).parse_args(argv)
    gpu = read_gpu_figures()
    costs = [stage_cost(stage, gpu) for stage in (1, 2, 3)]
    print("stage tasks  training_s  sampling_s  val_loss_s  share")
    for c in costs:
        print(f"{c.stage:>5} {c.tasks:>5} {c.train_seconds:>11.0f} {c.sample_seconds:>11.1f} "
              f"{c.loss_seconds:>11.1f} {100 * c.share:>5.2f}%")
    print(f"[validation-cost] at most {100 * max(c.share for c in costs):.2f}% of training time "
          f"(goal <= 5%), on one H200")
    return costs


if __name__ == "__main__":
    main()
