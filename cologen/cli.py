"""`cologen fit | validate | test | predict --config experiments/...` (LightningCLI), plus `cologen info` and
`cologen export`.

Configs are YAML with omegaconf interpolation (`${trainer.default_root_dir}`); the resolved config of every run is
written to its run directory (`trainer.default_root_dir`) as `config.yaml`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from .module import CoLoGenModule


class RunDirConfigCallback(SaveConfigCallback):
    """Write the resolved config to the run directory (and hand it to the logger) instead of the logger's dir."""

    def __init__(self, *args, **kwargs):
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        run_dir = Path(trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(run_dir / self.config_filename), skip_none=False, overwrite=True,
                         multifile=False)
        for logger in trainer.loggers:
            try:
                logger.log_hyperparams(self.config.as_dict())
            except Exception as err:  # a logger that cannot take nested dicts must not stop training
                print(f"[cologen] could not send the config to {type(logger).__name__}: {err}", file=sys.stderr)


def _run_lightning_cli(args: list[str]) -> None:
    os.environ.setdefault("WANDB_MODE", "offline")  # no account needed; `wandb sync` uploads later
    LightningCLI(
        CoLoGenModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        save_config_callback=RunDirConfigCallback,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf", "default_env": False},
        args=args,
    )


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    _run_lightning_cli(args)


if __name__ == "__main__":
    main()
