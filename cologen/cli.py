"""`cologen fit | validate | test | predict --config experiments/...` (LightningCLI), plus `cologen info`,
`cologen export` and `cologen eval`.

Configs are YAML with omegaconf interpolation (`${trainer.default_root_dir}`); the resolved config of every run is
written to its run directory (`trainer.default_root_dir`) as `config.yaml`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# transformers warns at import time that its image processors fall back to PIL without torchvision (which cologen
# does not need); that line would otherwise open every command's output.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import lightning as L  # noqa: E402
from jsonargparse import set_parsing_settings  # noqa: E402
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback  # noqa: E402

from .curriculum.callback import CurriculumCallback  # noqa: E402
from .module import CoLoGenModule  # noqa: E402


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


class CoLoGenCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The curriculum is a top-level config key (`curriculum.spec`), always attached to the trainer.
        parser.add_lightning_class_args(CurriculumCallback, "curriculum")


def _run_lightning_cli(args: list[str]) -> None:
    # omegaconf+ resolves interpolations after all --config files are merged (a stage file can move
    # trainer.default_root_dir and everything pointing at it follows); relative paths keep them valid under the
    # subcommand (fit/validate/...) level.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    os.environ.setdefault("WANDB_MODE", "offline")  # no account needed; `wandb sync` uploads later
    CoLoGenCLI(
        CoLoGenModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        save_config_callback=RunDirConfigCallback,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf+", "default_env": False},
        args=args,
    )


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "info":
        from .commands.info import main as info_main

        return info_main(args[1:])
    if args and args[0] == "export":
        from .commands.export import main as export_main

        return export_main(args[1:])
    if args and args[0] == "eval":
        from .commands.evaluate import main as eval_main

        return eval_main(args[1:])
    _run_lightning_cli(args)


if __name__ == "__main__":
    main()
