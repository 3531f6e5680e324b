"""MetricsSummary: the latest value of every logged scalar in `{default_root_dir}/summary.json` (what W&B keeps as a
run's summary, but readable without a server: the local sweep reads its trials' metric from it).

Validation values are logged per task (`val/loss/grounding`, one loader per task); the summary also holds each
such value without the task, averaged over the validated tasks (`val/loss` is the mean over tasks), and sends
those merged values to the loggers as well.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections import defaultdict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from cologen.data.tasks import TASKS

SUMMARY_ENV = "COLOGEN_SUMMARY_FILE"  # set by `cologen.sweep`: where a trial also writes its summary
_TASK_SUFFIX = re.compile(rf"^(val/.+)/({'|'.join(TASKS)})$")


def scalar_metrics(metrics: dict[str, object]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


def merge_task_keys(metrics: dict[str, float]) -> dict[str, float]:
    """`val/name/{task}` -> `val/name` (mean over the tasks), for names not logged without a task."""
    groups: dict[str, list[float]] = defaultdict(list)
    for key, value in metrics.items():
        match = _TASK_SUFFIX.match(key)
        if match:
            groups[match.group(1)].append(value)
    return {k: sum(v) / len(v) for k, v in groups.items() if k not in metrics}


class MetricsSummary(Callback):
    """Args:
    filename: file name under `trainer.default_root_dir`.
    """

    def __init__(self, filename: str = "summary.json"):
        self.filename = filename
        self.summary: dict[str, float] = {}

    def _update(self, trainer: L.Trainer, log_merged: bool) -> None:
        if not trainer.is_global_zero:
            return
        current = scalar_metrics(dict(trainer.callback_metrics))
        merged = merge_task_keys(current)
        if log_merged and merged:
            for logger in trainer.loggers:
                logger.log_metrics(merged, step=trainer.global_step)
        self.summary.update(current)
        self.summary.update(merged)
        self.summary["trainer/global_step"] = float(trainer.global_step)
        text = json.dumps(self.summary, indent=1, sort_keys=True) + "\n"
        paths = [Path(trainer.default_root_dir) / self.filename]
        if os.environ.get(SUMMARY_ENV):
            paths.append(Path(os.environ[SUMMARY_ENV]))
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)  # a reader never sees half a file

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.monotonic()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._update(trainer, log_merged=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(self, "_started", None) is not None:  # this fit's wall time (a resumed fit: its own part)
            self.summary["time/fit_seconds"] = round(time.monotonic() - self._started, 1)
        self._update(trainer, log_merged=False)
