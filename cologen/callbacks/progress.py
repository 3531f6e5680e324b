"""RunProgressBar: Lightning's tqdm bar, counting optimizer steps to the end of the run instead of batches to the end
of an epoch.

A curriculum run ends at `trainer.max_steps` (the CurriculumCallback sets it to the run's curriculum steps); its
epochs are only the data loader's unit (`data.batches_per_epoch`), so a per-epoch bar shows a count and an ETA for
batches that never run. This bar shows `global step / max_steps` with the ETA to the end of the run, and the
curriculum step in progress as its description (`grounding (curriculum step 1, 2 of 2 in this run)`); a resumed run
starts at the step it resumes from (the rate, and so the ETA, counts only the steps of this process). Without
`max_steps` it is Lightning's per-epoch bar. Validation and prediction bars are Lightning's.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


def _update(bar, n: int) -> None:
    if not bar.disable:
        bar.n = n
        bar.refresh()


class RunProgressBar(TQDMProgressBar):
    def __init__(self, refresh_rate: int = 1, process_position: int = 0):
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=False)
        self._total: int | None = None

    @staticmethod
    def describe(trainer: L.Trainer) -> str:
        from cologen.curriculum.callback import CurriculumCallback

        for cb in trainer.callbacks:
            if isinstance(cb, CurriculumCallback) and cb.enabled and cb.index is not None:
                run = cb.spec.selected()
                return (f"{cb.step.name} (curriculum step {cb.index}, {run.index(cb.index) + 1} of {len(run)} in "
                        "this run)")
        return "training"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self._total is None:
            return super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        if bar.total != self._total:  # the first epoch of this fit: one bar for the whole run
            bar.reset(total=self._total)
            bar.initial = bar.n = bar.last_print_n = trainer.global_step
        bar.set_description(self.describe(trainer), refresh=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._total is None:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, n = self.train_progress_bar, trainer.global_step
        if bar is not None and self._should_update(n, self._total):
            bar.set_description(self.describe(trainer), refresh=False)
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            _update(bar, n)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._total is None:
            return super().on_train_epoch_end(trainer, pl_module)
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
