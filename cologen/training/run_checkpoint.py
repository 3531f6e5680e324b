"""Checkpoints of a run directory: `last.ckpt` always reflects the latest finished step."""

from __future__ import annotations

import os

from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also writes `last.ckpt` when training stops between epochs (at `max_steps`), so a
    stage always leaves its final state for the next one. Writes go through Lightning's `_atomic_save` (a
    temporary file moved into place), so an interrupted save never leaves a truncated `last.ckpt`."""

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.save_last or trainer.fast_dev_run or self._last_global_step_saved == trainer.global_step:
            return
        path = os.path.join(self.dirpath or trainer.default_root_dir, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        trainer.save_checkpoint(path, self.save_weights_only)
        self.last_model_path = path
        self._last_global_step_saved = trainer.global_step
