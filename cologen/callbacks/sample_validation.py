"""SampleValidation: sample a fixed probe set per task at validation, write and log image grids, scores (ShapeWorld
metrics, or reference scores on real data; per probe and as means), the same with oracle routing, and the routing
of the sampled images.

Probes are the first `probes_per_task` examples of each task's validation set (the set is fixed and rebuilt
identically every time, so the probes are the same at every validation and on any number of ranks). Every probe
has its own noise seed (`seed + index`), so a probe's image depends only on the model. Under DDP and FSDP every
rank samples an equal share of the probes (FSDP must: each forward gathers the sharded weights on all ranks) and
rank zero writes and logs everything. Files go to `{default_root_dir}/{subdir}/step{global_step:06d}/`:
`{task}.png` (rows source | output | ground truth), `routing.png`, `routing_usage.csv/.json`, `metrics.json`
(means, oracle means under `val_metrics_oracle/`, routing shares, the curriculum step) and `scores.jsonl` (one
line per probe and routing mode, for confidence intervals).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image
from tqdm.auto import tqdm

from cologen.eval.probes import (
    SCORERS,
    Probe,
    ProbeRun,
    oracle_repeats_learned,
    own_expert_share,
    probe_group,
    probes_from_batch,
    run_probes,
)
from cologen.metrics.shapeworld import aggregate

from .grids import probe_caption, probe_grid
from .media import log_image, log_table
from .routing import RoutingCounts, count_routing, routing_figure, usage_rows, write_usage_tables


class SampleValidation(Callback):
    """Args:
    probes_per_task: examples sampled per validation task.
    steps: sampler (Euler) steps; null keeps the model's `sampler.steps`.
    seed: noise seed of probe 0 (probe i uses seed + i).
    every_n_val: sample at every N-th validation of `fit` (`cologen validate` always samples).
    metrics: how the samples are scored: 'shapeworld' (the synthetic scenes' exact ground truth, ShapeWorld tasks
        only), 'reference' (real data: PSNR/SSIM against the target, preservation outside the region, canny edge
        F1; `cologen/eval/reference_scores.py`) or 'none'.
    subdir: folder under `trainer.default_root_dir` for the files.
    sampler: further sampler settings for these samples (cfg_scale, image_cfg_scale, ...).
    min_side: grid cells are upscaled (nearest) to at least this many pixels.
    oracle: at the validation that closes the curriculum's last step, also sample every probe with oracle routing
        (each task on its curriculum step's expert) and report those scores beside the routers' (what routing
        loses; ShapeWorld metrics only).
    scope: when and which tasks are sampled. 'all': every validated task at every (every_n_val-th) validation.
        'curriculum': only at the validations that close a curriculum step (the validation loss is still logged at
        every validation), there the tasks the step introduced (their score right after their own step), and
        every validated task at the end of the curriculum's last step (sampling costs as much as training on a
        CPU). Every curriculum boundary of the run must then fall on a validation (`trainer.val_check_interval`).
        Without a curriculum, 'curriculum' samples every task at every validation.
    grid_probes: probes shown in each task's grid (all are scored).
    """

    def __init__(self, probes_per_task: int = 8, steps: int | None = 28, seed: int = 0, every_n_val: int = 1,
                 metrics: str = "shapeworld", subdir: str = "validation", sampler: dict[str, Any] | None = None,
                 min_side: int = 128, oracle: bool = False, scope: str = "all", grid_probes: int = 16):
        if scope not in ("all", "curriculum"):
            raise ValueError(f"SampleValidation scope must be 'all' or 'curriculum', got {scope!r}")
        if metrics not in SCORERS:
            raise ValueError(f"SampleValidation metrics must be one of {', '.join(SCORERS)}, got {metrics!r}")
        if probes_per_task < 1 or every_n_val < 1:
            raise ValueError(f"probes_per_task and every_n_val must be >= 1, got {probes_per_task}, {every_n_val}")
        self.probes_per_task, self.steps, self.seed = probes_per_task, steps, seed
        self.every_n_val, self.metrics, self.subdir = every_n_val, metrics, subdir
        self.sampler_overrides = dict(sampler or {})
        if steps is not None:
            self.sampler_overrides["steps"] = steps
        self.min_side = min_side
        self.oracle, self.scope, self.grid_probes = oracle, scope, grid_probes
        self.probes: dict[str, list[Probe]] = {}
        self.validations = 0
        self.last_dir: Path | None = None
        self.last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------- probe capture
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.probes = {}  # re-captured every time: the validation set is fixed, so they are the same examples

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not isinstance(batch, Mapping) or not {"task", "prompt", "target"} <= set(batch):
            return
        if "valid" in batch and not bool(batch["valid"].all()):
            return  # a DDP padding batch
        place = int(batch.get("batch_index", batch_idx))  # the batch's place in the fixed set, on any rank
        for i, probe in enumerate(probes_from_batch(batch, self.probes_per_task)):
            have = self.probes.setdefault(probe["task"], [])
            if len(have) < self.probes_per_task:
                have.append({**probe, "order": (place, i)})

    # ------------------------------------------------------------------------------------------------ sampling
    def _due(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != TrainerFn.FITTING:
            return True
        if self.scope == "curriculum":
            curriculum = curriculum_callback(trainer)
            if curriculum is not None:
                return curriculum.done >= curriculum.step.steps  # the validation closing a curriculum step
        self.validations += 1
        return self.validations % self.every_n_val == 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.scope != "curriculum":
            return
        curriculum = curriculum_callback(trainer, require_index=False)
        interval = trainer.val_check_interval
        if curriculum is None or not isinstance(interval, int):
            return
        missed = [e for e in curriculum.spec.step_ends() if e % interval]
        if missed:
            raise ValueError(f"SampleValidation(scope='curriculum') samples at the end of each curriculum step, but "
                             f"steps {missed} of this run are not multiples of trainer.val_check_interval ({interval})")

    @staticmethod
    def _can_encode_prompts(pl_module) -> bool:
        # generate() encodes prompts itself: runs on precomputed text embeddings only have no encoder for it
        return getattr(pl_module, "text_encoder", None) is not None or getattr(pl_module, "offload_text_encoder", False)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._due(trainer):
            return
        probes = self._all_probes(trainer)
        if not probes:
            return
        if not self._can_encode_prompts(pl_module):
            warnings.warn("SampleValidation: the model has no text encoder (model.load_text_encoder: false), "
                          "so it cannot sample; skipped", stacklevel=2)
            return
        with torch.random.fork_rng(devices=[]):  # sampling must not shift the training's random streams
            runs = self._sample(trainer, pl_module, probes)
        if trainer.is_global_zero:
            self._report(trainer, pl_module, probes, runs)
        trainer.strategy.barrier("sample_validation")

    def _all_probes(self, trainer: L.Trainer) -> dict[str, list[Probe]]:
        """The first `probes_per_task` examples of each task's validation set, on every rank. Each rank holds the
        first ones of its own batches (batch b is on rank b mod W), so together they hold the set's first ones:
        the same probes on any number of ranks."""
        if trainer.world_size == 1:
            return self.probes
        import torch.distributed as dist

        gathered: list[dict[str, list[Probe]]] = [{} for _ in range(trainer.world_size)]
        dist.all_gather_object(gathered, self.probes)
        merged: dict[str, list[Probe]] = {}
        for per_rank in gathered:
            for task, probes in per_rank.items():
                merged.setdefault(task, []).extend(probes)
        return {task: sorted(probes, key=lambda p: p["order"])[:self.probes_per_task]
                for task, probes in merged.items()}

    def _score(self, run: ProbeRun, prefix: str) -> dict[str, float]:
        if self.metrics == "none" or not run.rows:
            return {}
        return {f"{prefix}/{k}": v for k, v in aggregate(run.rows).items() if math.isfinite(v)}

    def _tasks(self, pl_module, probes: dict[str, list[Probe]], curriculum: dict[str, Any]) -> list[str]:
        if self.scope == "curriculum" and not curriculum.get("curriculum_last", True):
            own = {t for t, e in getattr(pl_module, "task_experts", {}).items()
                   if e == curriculum.get("curriculum_step")}
            return [t for t in probes if t in own]
        return list(probes)

    def _sample(self, trainer: L.Trainer, pl_module, probes: dict[str, list[Probe]]) -> dict[tuple[str, bool], ProbeRun]:
        """Every rank samples its share of each task's probes; rank zero gets the runs merged in probe order."""
        experts = max(int(getattr(pl_module.model, "num_active", 1)), 1)
        curriculum = self._curriculum_position(trainer)
        oracle_too = self.oracle and self.metrics != "none" and experts > 1 and curriculum.get("curriculum_last", True)
        runs: dict[tuple[str, bool], ProbeRun] = {}
        tasks = self._tasks(pl_module, probes, curriculum)
        bar = tqdm(tasks, desc="validation samples", leave=False,
                   disable=trainer.progress_bar_callback is None or not trainer.is_global_zero)
        for task in bar:
            bar.set_postfix_str(task)
            share, ids, keep = rank_share(probes[task], trainer.global_rank, trainer.world_size)
            learned = run_probes(pl_module, task, share, seed=self.seed, ids=ids, keep=keep, metrics=self.metrics,
                                 **self.sampler_overrides)
            for oracle in [False, True] if oracle_too else [False]:
                if not oracle:
                    run = learned
                elif trainer.strategy.reduce_boolean_decision(oracle_repeats_learned(pl_module, task, learned), all=True):
                    # exactly what oracle routing would sample; every rank decides alike, as they sample in step
                    if (task, False) in runs:  # rank zero
                        runs[(task, True)] = runs[(task, False)]
                    continue
                else:
                    run = run_probes(pl_module, task, share, seed=self.seed, oracle=True, ids=ids, keep=keep,
                                     metrics=self.metrics, **self.sampler_overrides)
                kept = [i for i, k in zip(ids, keep) if k]
                shares = _gather(trainer, (kept, run))
                if shares:  # rank zero
                    runs[(task, oracle)] = merge_runs(shares)
        return runs

    def _report(self, trainer: L.Trainer, pl_module, probes: dict[str, list[Probe]],
                runs: dict[tuple[str, bool], ProbeRun]) -> None:
        step = _global_step(trainer, pl_module)
        out_dir = Path(trainer.default_root_dir) / self.subdir / f"step{step:06d}"
        out_dir.mkdir(parents=True, exist_ok=True)
        bins = pl_module.prw_config.router.timestep_bins or 4
        experts = max(int(getattr(pl_module.model, "num_active", 1)), 1)
        scalars: dict[str, float] = {}
        lines: list[dict[str, Any]] = []
        per_task: dict[str, RoutingCounts] = {}
        hits = misses = 0
        curriculum = self._curriculum_position(trainer)
        for (task, oracle), run in runs.items():
            task_probes = probes[task]
            scalars.update(self._score(run, "val_metrics_oracle" if oracle else "val_metrics"))
            lines += [{"task": task, "key": p["key"], "index": i, "routing": "oracle" if oracle else "learned",
                       **row} for i, (p, row) in enumerate(zip(task_probes, run.rows))]
            if oracle:
                continue
            hits, misses = hits + run.cache_hits, misses + run.cache_misses
            shown = task_probes[:self.grid_probes]
            scores = run.rows[:len(shown)] if run.rows else [{}] * len(shown)
            grid = probe_grid([p["source"] for p in shown], run.outputs[:len(shown)],
                              [p["target"] for p in shown], self.min_side,
                              captions=[probe_caption(p["prompt"], row) for p, row in zip(shown, scores)])
            Image.fromarray(grid).save(out_dir / f"{task}.png")
            log_image(trainer, f"val_samples/{task}", grid, step,
                      caption="rows: source | output | ground truth; under each column its prompt and scores")
            counts = count_routing(run.routing, experts, bins)
            if counts is not None:
                per_task[task] = counts
                own = pl_module.task_experts.get(task) if hasattr(pl_module, "task_experts") else None
                if own is not None:
                    scalars[f"val_routing/{task}/own_expert"] = own_expert_share(run.routing, own)
        if hits + misses:
            scalars["sampler/cache_hit_rate"] = hits / (hits + misses)
        if per_task:
            self._report_routing(trainer, per_task, out_dir, step, scalars)
        if getattr(pl_module, "task_experts", None):
            curriculum["task_experts"] = dict(pl_module.task_experts)
        (out_dir / "metrics.json").write_text(json.dumps({**scalars, **curriculum}, indent=1, sort_keys=True) + "\n")
        with open(out_dir / "scores.jsonl", "w") as f:
            for line in lines:
                f.write(json.dumps({k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                                    for k, v in line.items()}) + "\n")
        for name, value in scalars.items():
            pl_module.log(name, float(value), on_step=False, on_epoch=True, batch_size=1, rank_zero_only=True,
                          add_dataloader_idx=False)
        self.last_dir, self.last_metrics = out_dir, scalars

    @staticmethod
    def _curriculum_position(trainer: L.Trainer) -> dict[str, Any]:
        """The curriculum step this validation closes (`curriculum_step`, `curriculum_name`, and whether it is the
        curriculum's last step, `curriculum_last`), if any."""
        cb = curriculum_callback(trainer)
        if cb is None:
            return {}
        return {"curriculum_step": int(cb.index), "curriculum_name": cb.step.name,
                "curriculum_last": cb.index == len(cb.spec.steps) - 1}

    def _report_routing(self, trainer: L.Trainer, per_task: dict[str, RoutingCounts], out_dir: Path, step: int,
                        scalars: dict[str, float]) -> None:
        cb = curriculum_callback(trainer, require_index=False)
        names = [st.name for st in cb.spec.steps] if cb is not None else None
        path = routing_figure(per_task, out_dir / "routing.png", title=f"expert usage at step {step}",
                              expert_names=names)
        log_image(trainer, "val_routing/heatmap", np.asarray(Image.open(path).convert("RGB")), step)
        write_usage_tables(per_task, out_dir, step)
        columns, rows = usage_rows(per_task)
        log_table(trainer, "val_routing/usage", columns, rows, step)
        for row in rows:
            for column, share in zip(columns[1:], row[1:]):
                if share is not None:
                    scalars[f"val_routing/{row[0]}/{column}"] = float(share)


def rank_share(probes: list[Probe], rank: int, world: int) -> tuple[list[Probe], list[int], list[bool]]:
    """This rank's share of a task's probes as (probes, their indices in `probes`, keep flags): per `probe_group`,
    every `world`-th probe from `rank` on, topped up with fillers (the group's first probe, keep False) so that every
    rank samples the same groups with the same counts, i.e. makes the same model calls."""
    groups: dict[tuple[bool, int, int, int], list[int]] = {}
    for i, p in enumerate(probes):
        groups.setdefault(probe_group(p), []).append(i)
    share: list[Probe] = []
    ids: list[int] = []
    keep: list[bool] = []
    for group in sorted(groups):
        idx = groups[group]
        mine = idx[rank::world]
        fill = -(-len(idx) // world) - len(mine)
        share += [probes[i] for i in mine] + [probes[idx[0]]] * fill
        ids += mine + [idx[0]] * fill
        keep += [True] * len(mine) + [False] * fill
    return share, ids, keep


def merge_runs(shares: list[tuple[list[int], ProbeRun]]) -> ProbeRun:
    """One run from every rank's (probe indices, run), in probe order."""
    by_index: dict[int, tuple[torch.Tensor, dict[str, float] | None]] = {}
    routing: list = []
    hits = misses = 0
    for ids, run in shares:
        rows = run.rows or [None] * len(ids)
        by_index.update({i: (out, row) for i, out, row in zip(ids, run.outputs, rows)})
        routing += run.routing
        hits, misses = hits + run.cache_hits, misses + run.cache_misses
    order = sorted(by_index)
    rows = [by_index[i][1] for i in order]
    return ProbeRun(shares[0][1].task, [by_index[i][0] for i in order],
                    [] if any(r is None for r in rows) else rows, routing, hits, misses)


def _gather(trainer: L.Trainer, obj: Any) -> list[Any]:
    """Every rank's `obj` on rank zero (a one-element list on one process; others get [])."""
    if trainer.world_size == 1:
        return [obj]
    import torch.distributed as dist

    gathered: list[Any] = [None] * trainer.world_size if trainer.is_global_zero else None  # type: ignore[assignment]
    dist.gather_object(obj, gathered, dst=0)
    return gathered if trainer.is_global_zero else []


def _global_step(trainer: L.Trainer, pl_module) -> int:
    """The step the samples belong to: the trainer's while fitting; the loaded checkpoint's in `cologen validate`
    (which restores weights, not the training loop, so its trainer is at step 0)."""
    if trainer.state.fn == TrainerFn.FITTING:
        return int(trainer.global_step)
    return int(getattr(pl_module, "checkpoint_step", None) or trainer.global_step)


def curriculum_callback(trainer: L.Trainer, require_index: bool = True):
    """The run's CurriculumCallback with a curriculum (in a step, unless `require_index` is False), else None."""
    from cologen.curriculum.callback import CurriculumCallback

    for cb in trainer.callbacks:
        if isinstance(cb, CurriculumCallback) and cb.enabled and (cb.index is not None or not require_index):
            return cb
    return None
