"""RunThroughput: what a long run's speed is, every logging interval (`perf/*` keys, docs/logging.md).

Per optimizer step, averaged over the interval: the step time, samples/s and image tokens/s (noisy + source tokens),
the share of the interval spent waiting for the data loader, the peak accelerator memory, the model FLOPs
utilisation (MFU, with `cologen/training/flops.py` and Lightning's table of peak device FLOPs: GPUs it knows only;
nothing on a CPU) and the ETA to the end of the run (`trainer.max_steps`: the curriculum steps of this run). A
resumed run counts from the step it resumes at.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

Shape = tuple[int, int, int, int, int]  # samples, samples with a source, noisy / source / text tokens per sample


class RunThroughput(Callback):
    """Args:
    every_n_steps: logging interval in optimizer steps (default: the trainer's `log_every_n_steps`).
    """

    def __init__(self, every_n_steps: int | None = None):
        self.every_n_steps = every_n_steps
        self._reset()
        self._last_end: float | None = None
        self._peak_flops: float | None = None
        self._flops_by_shape: dict[Shape, float] = {}

    def _reset(self) -> None:
        self._steps = self._samples = self._tokens = 0
        self._compute = self._wait = self._flops = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning.fabric.utilities.throughput import get_available_flops

        self._reset()
        self._last_end = None
        self._global_step = trainer.global_step
        dtype = next(pl_module.model.transformer.parameters()).dtype
        self._peak_flops = get_available_flops(pl_module.device, dtype) if pl_module.device.type == "cuda" else None
        if self._peak_flops is not None:
            self._peak_flops *= trainer.world_size
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_end is not None:  # the loader's turn: from the last batch's end to this batch's start
            self._wait += now - self._last_end
        self._start = now

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.perf_counter()
        self._compute += now - self._start
        self._last_end = now
        shape = batch_shape(pl_module, batch)
        if shape not in self._flops_by_shape:  # counted once per batch shape: batches repeat a few shapes
            self._flops_by_shape[shape] = shape_flops(pl_module, shape)
        samples, with_source, noisy, src_tokens, _ = shape
        tokens, flops = samples * noisy + with_source * src_tokens, self._flops_by_shape[shape]
        self._samples += samples * trainer.world_size
        self._tokens += tokens * trainer.world_size
        self._flops += flops * trainer.world_size
        if trainer.global_step > self._global_step:  # an optimizer step ended (not a gradient-accumulation batch)
            self._steps += trainer.global_step - self._global_step
            self._global_step = trainer.global_step
        every = self.every_n_steps or trainer.log_every_n_steps
        if self._steps >= every:
            self._log(trainer, pl_module)
            self._reset()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_end = None  # validation is not the loader's wait

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = self._compute + self._wait
        step = seconds / self._steps
        metrics = {"perf/step_seconds": step, "perf/samples_per_second": self._samples / seconds,
                   "perf/tokens_per_second": self._tokens / seconds, "perf/data_wait_fraction": self._wait / seconds}
        if trainer.max_steps and trainer.max_steps > 0:
            metrics["perf/eta_seconds"] = max(trainer.max_steps - trainer.global_step, 0) * step
        if self._peak_flops and self._flops:
            metrics["perf/mfu"] = self._flops / seconds / self._peak_flops
        if pl_module.device.type == "cuda":
            metrics["perf/peak_memory_gb"] = torch.cuda.max_memory_allocated(pl_module.device) / 1e9
        for logger in trainer.loggers if trainer.is_global_zero else []:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})


def batch_shape(pl_module: L.LightningModule, batch: dict) -> Shape:
    target = batch["target"]
    patch = pl_module.codec.patch_pixels
    b, noisy = int(target.shape[0]), int(target.shape[-2] * target.shape[-1]) // patch**2
    source = batch.get("source")
    with_source = int(batch["has_source"].sum()) if source is not None and "has_source" in batch else 0
    src_tokens = int(source.shape[-2] * source.shape[-1]) // patch**2 if with_source else 0
    return b, with_source, noisy, src_tokens, int(getattr(pl_module.preset, "text_max_length", 0))


def shape_flops(pl_module: L.LightningModule, shape: Shape) -> float:
    """Model FLOPs of a training step on a batch of this shape (cologen/training/flops.py, which counts the paper's
    K/V experts; options on more projections add their LoRA matmuls, a few percent)."""
    from cologen.training.flops import Workload, training_step_flops

    b, with_source, noisy, src_tokens, text = shape
    config, prw = pl_module.model.transformer.config, pl_module.prw_config
    parts = [Workload(with_source, noisy, src_tokens, text), Workload(b - with_source, noisy, 0, text)]
    return sum(training_step_flops(config, w, prw.rank, prw.num_experts, prw.blocks).total for w in parts if w.batch)


def workload(pl_module: L.LightningModule, batch: dict) -> tuple[int, int, float]:
    """(samples, image tokens, model FLOPs) of one training batch on this rank."""
    shape = batch_shape(pl_module, batch)
    b, with_source, noisy, src_tokens, _ = shape
    return b, b * noisy + with_source * src_tokens, shape_flops(pl_module, shape)
