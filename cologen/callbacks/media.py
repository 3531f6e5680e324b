"""Send images and tables to whichever loggers a run has (W&B, TensorBoard); file-only loggers get nothing here,
the PNG/CSV files in the run directory are their record."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger


def log_image(trainer: L.Trainer, key: str, image: np.ndarray, step: int, caption: str | None = None) -> None:
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], step=step, **({"caption": [caption]} if caption else {}))
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, global_step=step, dataformats="HWC")


def log_table(trainer: L.Trainer, key: str, columns: list[str], rows: Sequence[Sequence[object]],
              step: int) -> None:
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=columns, data=[list(r) for r in rows], step=step)
        elif isinstance(logger, TensorBoardLogger):
            header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
            body = "".join("| " + " | ".join(str(v) for v in r) + " |\n" for r in rows)
            logger.experiment.add_text(key, header + body, global_step=step)
