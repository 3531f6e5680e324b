"""StageEndBenchmark: at the end of each curriculum step, score the model on the benchmark protocol that matches the
step (`cologen eval PROTOCOL`: DreamBench after customized, MagicBrush after editing, MultiGen after control) on a
subset, and log its table. For runs whose metric networks (CLIP, DINO, depth, ...) have local weights.

The step ends at a validation (the flux_dev steps are multiples of the validation cadence; RunCheckpoint has saved
that step before it runs, so nothing trained depends on the benchmark). Every rank generates the same samples (under
FSDP each forward needs all ranks); rank zero scores them, writes `{default_root_dir}/benchmarks/
step{global_step:07d}_{protocol}/` (what `cologen eval` writes) and logs `benchmark/{protocol}/{metric}` and the
table. Inputs (shards, weight paths, the commands themselves) are checked when the run starts, in one line each.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from .media import log_table
from .sample_validation import curriculum_callback


class StageEndBenchmark(Callback):
    """Args:
    benchmarks: curriculum step name -> the `cologen eval` command for it without --ckpt and --out, e.g.
        `{customized: "dreambench --data data/eval/dreambench --clip models/clip --dino models/dino"}`.
    limit: samples per benchmark (the first ones of its shards).
    steps: sampler steps (default: the model's).
    """

    def __init__(self, benchmarks: dict[str, str], limit: int = 64, steps: int | None = None):
        if limit < 1:
            raise ValueError(f"StageEndBenchmark limit must be >= 1, got {limit}")
        self.benchmarks, self.limit, self.steps = dict(benchmarks), limit, steps
        self.last_results: dict[str, float] = {}

    def _args(self, step_name: str, out: Path) -> argparse.Namespace:
        from cologen.commands.evaluate import benchmark_args

        args = benchmark_args(self.benchmarks[step_name], out, self.limit)
        if self.steps is not None and args.steps is None:
            args.steps = self.steps
        return args

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from cologen.commands.evaluate import check_benchmark_inputs
        from cologen.eval.protocols import PROTOCOLS

        if stage != "fit":
            return
        curriculum = curriculum_callback(trainer, require_index=False)
        names = {s.name for s in curriculum.spec.steps} if curriculum is not None else set()
        unknown = sorted(set(self.benchmarks) - names)
        if unknown:
            raise ValueError(f"StageEndBenchmark: {unknown} are not curriculum steps (steps: {sorted(names)})")
        for name in self.benchmarks:
            args = self._args(name, Path(trainer.default_root_dir) / "benchmarks")
            check_benchmark_inputs(args)
            task = next(s for s in curriculum.spec.steps if s.name == name).mixture  # type: ignore[union-attr]
            if PROTOCOLS[args.protocol].task not in task:
                raise ValueError(f"StageEndBenchmark: step {name!r} trains {sorted(task)}, but {args.protocol} "
                                 f"scores {PROTOCOLS[args.protocol].task}")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        curriculum = curriculum_callback(trainer)
        if curriculum is None or curriculum.done < curriculum.step.steps or curriculum.step.name not in self.benchmarks:
            return
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            self._run(trainer, pl_module, curriculum.step.name)
        trainer.strategy.barrier("stage_end_benchmark")

    def _run(self, trainer: L.Trainer, pl_module, step_name: str) -> None:
        from cologen.commands.evaluate import ModelGenerate, benchmark_samples, run_benchmark
        from cologen.commands.export import pipeline_from_module
        from cologen.eval.protocols import PROTOCOLS

        step = int(trainer.global_step)
        args = self._args(step_name, Path())
        args.out = str(Path(trainer.default_root_dir) / "benchmarks" / f"step{step:07d}_{args.protocol}")
        pipe = pipeline_from_module(pl_module)  # the module is in eval mode here (validation)
        if not trainer.is_global_zero:  # the same model calls as rank zero, nothing scored or written
            generate = ModelGenerate(pipe, PROTOCOLS[args.protocol].task, steps=args.steps, size=args.size,
                                     seed=args.seed)
            for sample in benchmark_samples(args):
                generate(sample)
            return
        means = run_benchmark(args, pipe=pipe)
        scalars = {f"benchmark/{args.protocol}/{k}": float(v) for k, v in means.items() if math.isfinite(v)}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
        rows = [[k, None if not math.isfinite(v) else round(float(v), 4)] for k, v in means.items()]
        log_table(trainer, f"benchmark/{args.protocol}", ["metric", "mean"], rows, step)
        self.last_results = scalars
