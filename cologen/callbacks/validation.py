"""SampleValidation: sample a fixed probe set per task at validation, write and log image grids, ShapeWorld
metrics and the routing of the sampled images.

Probes are the first `probes_per_task` examples each task's validation loader yields (the validation set is
fixed and rebuilt identically every time, so the probes are the same at every validation; under DDP they are
rank zero's first batches). Every probe has its own noise seed (`seed + index`), so a probe's image depends only
on the model. Files go to `{default_root_dir}/{subdir}/step{global_step:06d}/`:
`{task}.png` (rows source | output | ground truth), `routing.png`, `routing_usage.csv/.json`, `metrics.json`.
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

from cologen.eval.shapeworld import TASKS as SHAPEWORLD_TASKS
from cologen.eval.shapeworld import score_sample
from cologen.metrics.images import to_uint8_rgb
from cologen.metrics.shapeworld import aggregate

from .grids import probe_grid
from .media import log_image, log_table
from .routing import RoutingCounts, count_routing, routing_figure, usage_rows, write_usage_tables

Probe = dict[str, Any]


def probes_from_batch(batch: Mapping[str, Any], limit: int) -> list[Probe]:
    """Up to `limit` examples of a collated batch as standalone dicts (CPU copies; the batch can be freed)."""
    out: list[Probe] = []
    for i in range(min(limit, len(batch["task"]))):
        region = batch["region"][i, 0].cpu().numpy() > 0 if "region" in batch else None
        has_source = bool(batch["has_source"][i]) if "has_source" in batch else False
        out.append({
            "task": batch["task"][i], "prompt": batch["prompt"][i],
            "key": batch["key"][i] if "key" in batch else str(i),
            "target": batch["target"][i].detach().cpu().clone(),
            "source": batch["source"][i].detach().cpu().clone() if has_source else None,
            # collate stores an absent region as zeros; the scorers expect None then
            "region": region if region is not None and region.any() else None,
            "meta": batch["meta"][i] if "meta" in batch else {},
        })
    return out


class SampleValidation(Callback):
    """Args:
    probes_per_task: examples sampled per validation task.
    steps: sampler (Euler) steps; null keeps the model's `sampler.steps`.
    seed: noise seed of probe 0 (probe i uses seed + i).
    every_n_val: sample at every N-th validation of `fit` (`cologen validate` always samples).
    metrics: score the samples with the ShapeWorld metrics (ShapeWorld tasks only).
    subdir: folder under `trainer.default_root_dir` for the files.
    sampler: further sampler settings for these samples (cfg_scale, image_cfg_scale, ...).
    min_side: grid cells are upscaled (nearest) to at least this many pixels.
    """

    def __init__(self, probes_per_task: int = 8, steps: int | None = 28, seed: int = 0, every_n_val: int = 1,
                 metrics: bool = True, subdir: str = "validation", sampler: dict[str, Any] | None = None,
                 min_side: int = 128):
        if probes_per_task < 1 or every_n_val < 1:
            raise ValueError(f"probes_per_task and every_n_val must be >= 1, got {probes_per_task}, {every_n_val}")
        self.probes_per_task, self.steps, self.seed = probes_per_task, steps, seed
        self.every_n_val, self.metrics, self.subdir = every_n_val, metrics, subdir
        self.sampler_overrides = dict(sampler or {})
        if steps is not None:
            self.sampler_overrides["steps"] = steps
        self.min_side = min_side
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
        for probe in probes_from_batch(batch, self.probes_per_task):
            have = self.probes.setdefault(probe["task"], [])
            if len(have) < self.probes_per_task:
                have.append(probe)

    # ------------------------------------------------------------------------------------------------ sampling
    def _due(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != TrainerFn.FITTING:
            return True
        self.validations += 1
        return self.validations % self.every_n_val == 0

    @staticmethod
    def _can_encode_prompts(pl_module) -> bool:
        # generate() encodes prompts itself: runs on precomputed text embeddings only have no encoder for it
        return getattr(pl_module, "text_encoder", None) is not None or getattr(pl_module, "offload_text_encoder", False)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._due(trainer) or not self.probes:
            return
        if not self._can_encode_prompts(pl_module):
            warnings.warn("SampleValidation: the model has no text encoder (model.load_text_encoder: false), "
                          "so it cannot sample; skipped", stacklevel=2)
            return
        if trainer.is_global_zero:
            with torch.random.fork_rng(devices=[]):  # sampling must not shift the training's random streams
                self._sample_and_report(trainer, pl_module)
        trainer.strategy.barrier("sample_validation")

    def _generate(self, pl_module, probes: list[Probe]) -> tuple[list[torch.Tensor], list, int, int]:
        """Outputs in probe order; probes with and without a source go in separate calls (seeds are per probe)."""
        outputs: list[torch.Tensor | None] = [None] * len(probes)
        routing: list = []
        hits = misses = 0
        for with_source in (True, False):
            idx = [i for i, p in enumerate(probes) if (p["source"] is not None) == with_source]
            if not idx:
                continue
            h, w = probes[idx[0]]["target"].shape[-2:]
            sources = torch.stack([probes[i]["source"] for i in idx]) if with_source else None
            images, stats = pl_module.generate([probes[i]["prompt"] for i in idx], sources,
                                               [probes[i]["task"] for i in idx], height=h, width=w,
                                               seed=[self.seed + i for i in idx], **self.sampler_overrides)
            for j, i in enumerate(idx):
                outputs[i] = images[j].float().cpu()
            routing += stats.routing
            hits, misses = hits + stats.cache_hits, misses + stats.cache_misses
        return outputs, routing, hits, misses  # type: ignore[return-value]

    def _score(self, task: str, probes: list[Probe], outputs: list[torch.Tensor]) -> dict[str, float]:
        if not self.metrics or task not in SHAPEWORLD_TASKS:
            return {}
        try:
            rows = [score_sample(p, to_uint8_rgb(o)) for p, o in zip(probes, outputs)]
        except Exception as err:  # noqa: BLE001 - data without ShapeWorld ground truth must not stop training
            warnings.warn(f"SampleValidation: no ShapeWorld metrics for {task}: {err!r}", stacklevel=2)
            return {}
        return {f"val_metrics/{k}": v for k, v in aggregate(rows).items() if math.isfinite(v)}

    def _sample_and_report(self, trainer: L.Trainer, pl_module) -> None:
        step = int(trainer.global_step)
        out_dir = Path(trainer.default_root_dir) / self.subdir / f"step{step:06d}"
        out_dir.mkdir(parents=True, exist_ok=True)
        bins = pl_module.prw_config.router.timestep_bins or 4
        experts = max(int(getattr(pl_module.model, "num_active", 1)), 1)
        scalars: dict[str, float] = {}
        per_task: dict[str, RoutingCounts] = {}
        hits = misses = 0
        bar = tqdm(self.probes.items(), desc="validation samples", leave=False,
                   disable=trainer.progress_bar_callback is None)
        for task, probes in bar:
            bar.set_postfix_str(task)
            outputs, routing, h, m = self._generate(pl_module, probes)
            hits, misses = hits + h, misses + m
            grid = probe_grid([p["source"] for p in probes], outputs, [p["target"] for p in probes], self.min_side)
            Image.fromarray(grid).save(out_dir / f"{task}.png")
            log_image(trainer, f"val_samples/{task}", grid, step, caption="rows: source | output | ground truth")
            scalars.update(self._score(task, probes, outputs))
            counts = count_routing(routing, experts, bins)
            if counts is not None:
                per_task[task] = counts
        if hits + misses:
            scalars["sampler/cache_hit_rate"] = hits / (hits + misses)
        if per_task:
            self._report_routing(trainer, per_task, out_dir, step, scalars)
        (out_dir / "metrics.json").write_text(json.dumps(scalars, indent=1, sort_keys=True) + "\n")
        for name, value in scalars.items():
            pl_module.log(name, float(value), on_step=False, on_epoch=True, batch_size=1, rank_zero_only=True,
                          add_dataloader_idx=False)
        self.last_dir, self.last_metrics = out_dir, scalars

    def _report_routing(self, trainer: L.Trainer, per_task: dict[str, RoutingCounts], out_dir: Path, step: int,
                        scalars: dict[str, float]) -> None:
        path = routing_figure(per_task, out_dir / "routing.png", title=f"expert usage at step {step}")
        log_image(trainer, "val_routing/heatmap", np.asarray(Image.open(path).convert("RGB")), step)
        write_usage_tables(per_task, out_dir, step)
        columns, rows = usage_rows(per_task)
        log_table(trainer, "val_routing/usage", columns, rows, step)
        for row in rows:
            for column, share in zip(columns[1:], row[1:]):
                if share is not None:
                    scalars[f"val_routing/{row[0]}/{column}"] = float(share)
