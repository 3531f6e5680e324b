"""The LightningCLI behind `cologen fit | validate | test | predict`: the run directory's config, one-line errors
for config mistakes, the curriculum and progress callbacks (the dispatcher is cologen/cli.py)."""

from __future__ import annotations

import os
import sys
from argparse import ArgumentError
from pathlib import Path

from .quiet import quiet_known_messages

quiet_known_messages()  # before Lightning and transformers are imported

import lightning as L  # noqa: E402
from jsonargparse import set_parsing_settings  # noqa: E402
from lightning.pytorch.callbacks import ProgressBar  # noqa: E402
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback  # noqa: E402

from . import checkpoints  # noqa: E402
from .callbacks.progress import RunProgressBar  # noqa: E402
from .cli import LIGHTNING_COMMANDS  # noqa: E402
from .config_errors import explain, unknown_top_level_key  # noqa: E402
from .curriculum.callback import CurriculumCallback  # noqa: E402
from .errors import UsageError  # noqa: E402
from .module import CoLoGenModule  # noqa: E402
from .training.wandb_logger import wandb_mode  # noqa: E402


class RunFinished(Exception):
    """Resuming a run that has nothing left to do: said in one line, exit status 0."""


class RequestsFailed(Exception):
    """`cologen predict` ran, but some requests failed: said in one line, exit status 1."""


class RunDirConfigCallback(SaveConfigCallback):
    """Write the resolved config to the run directory (and hand it to the logger) instead of the logger's dir."""

    def __init__(self, *args, **kwargs):
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        run_dir = Path(getattr(trainer.datamodule, "output_dir", None) or trainer.default_root_dir) \
            if stage == "predict" else Path(trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(run_dir / self.config_filename), skip_none=False, overwrite=True,
                         multifile=False)
        for logger in trainer.loggers:
            try:
                logger.log_hyperparams(self.config.as_dict())
            except Exception as err:  # a logger that cannot take nested dicts must not stop training
                print(f"[cologen] could not send the config to {type(logger).__name__}: {err}", file=sys.stderr)


def _given(argv: list[str], option: str) -> bool:
    return any(a == option or a.startswith(option + "=") for a in argv)


class CoLoGenCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The curriculum is a top-level config key (`curriculum.spec`), always attached to the trainer.
        parser.add_lightning_class_args(CurriculumCallback, "curriculum")

    def parse_arguments(self, parser, args) -> None:
        """LightningCLI's parsing, with a config error said in one line, the checkpoint checked before Lightning
        reads its hyper-parameters, and `validate` / `test` moved into a folder of their own."""
        argv = list(sys.argv[1:] if args is None else args)
        sub = argv[0] if argv and argv[0] in self.subcommands() else None
        unknown = unknown_top_level_key(argv, self._parser(sub)) if sub else None
        if unknown:
            raise UsageError(unknown)
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise UsageError(explain(str(err), argv, self._parser(sub) if sub else parser)) from None
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt:
            checkpoints.check(ckpt)
        if sub in ("validate", "test") and not _given(argv, "--trainer.default_root_dir"):
            # its own folder (config.yaml, loggers, samples), named after the checkpoint: never the training run's
            root = Path(self.config[sub].trainer.default_root_dir or ".")
            folder = root / sub / (Path(ckpt).stem if ckpt else "no_checkpoint")
            saved = sys.argv
            sys.argv = [saved[0] if saved else "cologen", *argv, "--trainer.default_root_dir", str(folder)]
            try:
                super().parse_arguments(parser, None)
            finally:
                sys.argv = saved

    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        if sub != "fit":
            return
        config = self.config[sub]
        spec = config.get("curriculum", {}).get("spec") if config.get("curriculum") else None
        if spec is not None and getattr(spec, "steps", None) and config.trainer.get("max_epochs") is None:
            config.trainer.max_epochs = -1  # the curriculum ends the run (max_steps), not an epoch count

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        self._preflight()  # before the trainer (and its loggers, run folder) exist
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, RunProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def _preflight(self) -> None:
        """What can be checked before anything is created: a resumed run that has nothing left to do (said, exit
        0), and the data the command reads (every shard pattern matches files)."""
        sub = self.subcommand
        if sub == "fit":
            ckpt = self._get(self.config_init, "ckpt_path")
            curriculum = self._get(self.config_init, "curriculum")
            if ckpt and isinstance(curriculum, CurriculumCallback):
                done = curriculum.resume_status(checkpoints.curriculum_state(checkpoints.check(ckpt)), ckpt)
                if done:
                    raise RunFinished(done)
        locate = getattr(self.datamodule, "locate_shards", None)
        if sub in ("fit", "validate", "test") and callable(locate):
            locate(sub)

    def after_predict(self) -> None:
        from .predict import PredictionWriter

        for cb in self.trainer.callbacks:
            if isinstance(cb, PredictionWriter) and cb.failed:
                raise RequestsFailed(f"{cb.failed} of {cb.total} request(s) failed; their lines in {cb.results_path} "
                                     "say why")


def _run_lightning_cli() -> None:
    # omegaconf+ resolves interpolations after all --config files are merged (a stage file can move
    # trainer.default_root_dir and everything pointing at it follows); relative paths keep them valid under the
    # subcommand (fit/validate/...) level.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    # online for a logged-in user, else offline (no account needed; `wandb sync` uploads later)
    os.environ.setdefault("WANDB_MODE", wandb_mode())
    no_exit = {"exit_on_error": False}  # errors come back as exceptions and are said in one line
    CoLoGenCLI(
        CoLoGenModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        save_config_callback=RunDirConfigCallback,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf+", "default_env": False, **no_exit,
                       **{name: dict(no_exit) for name in LIGHTNING_COMMANDS}},
    )  # it parses sys.argv (main sets it for a call from Python)


