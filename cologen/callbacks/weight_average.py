"""An exponential moving average of the weights that never replaces trained weights with untrained ones.

Lightning's `EMAWeightAveraging` copies its average into the model when training ends, and checkpoints the
average as `state_dict`. Before its first update (`update_starting_at_step` not reached: a run stopped early by
`max_time`, a crash, a short trial) that average is the starting weights, so the run's last checkpoint would hold
what it started from and nothing it trained. Until the average has started, this one keeps the live weights.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging as LightningEMA
from lightning.pytorch.utilities import rank_zero_info


class EMAWeightAveraging(LightningEMA):
    def average_started(self) -> bool:
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.average_started():
            super().on_train_end(trainer, pl_module)
        else:
            rank_zero_info("EMA: training ended before the average's first update; the last weights are kept")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.average_started() or self._average_model is None:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
        else:  # the live weights stay `state_dict`; Lightning's layout, so a resumed run restores both as they were
            checkpoint["current_model_state"] = checkpoint["state_dict"]
            checkpoint["averaging_state"] = {"n_averaged": self._average_model.n_averaged.detach().clone()}
