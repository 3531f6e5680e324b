"""CurriculumCallback: walks the curriculum's steps by optimizer step (not by epoch).

It decides when a step starts and hands the work to the two owners: `CoLoGenModule.enter_curriculum_step` (the
next expert, copy init, frozen veterans, rho and alpha, learning rates and schedule restart) and
`MixtureDataModule.set_mixture_schedule` (the data mixture of every step, switched at exactly the boundary's
batch); it logs each entry. Its position (step index, optimizer steps done in it) is saved in the checkpoint, so a run
resumed from `last.ckpt` continues exactly where it stopped.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from cologen.data.datamodule import MixtureDataModule
from cologen.errors import UsageError

from .spec import CurriculumSpec, CurriculumStep

log = logging.getLogger("cologen.curriculum")


class CurriculumCallback(Callback):
    """Args:
    spec: the curriculum (steps and the `run_steps` this run executes); no steps disables the callback
        (plain training, e.g. the tiny base's pretraining).
    """

    def __init__(self, spec: CurriculumSpec | None = None):
        self.spec = spec or CurriculumSpec()
        self.index: int | None = None  # curriculum step in progress
        self.done = 0  # optimizer steps done in it
        self._resumed = False
        self._last_global_step = -1

    # ----------------------------------------------------------------------------------------------- helpers
    @property
    def enabled(self) -> bool:
        return bool(self.spec.steps)

    @property
    def step(self) -> CurriculumStep:
        return self.spec.steps[self.index]

    def _end_of_run(self) -> int:
        return self.spec.selected()[-1]

    @staticmethod
    def _datamodule(trainer: L.Trainer) -> MixtureDataModule | None:
        """The fit's data, which the curriculum switches (None: plain dataloaders, nothing to switch)."""
        dm = getattr(trainer, "datamodule", None)
        if dm is None or isinstance(dm, MixtureDataModule):
            return dm
        raise UsageError(f"the curriculum switches the data mixture at its step boundaries: data must be a "
                         f"MixtureDataModule, got {type(dm).__name__}")

    def mixture_schedule(self, accumulate: int = 1) -> list[tuple[int, dict[str, float]]]:
        """(first batch of this fit, mixture) per curriculum step of the run: the data switches at exactly the
        optimizer step where the callback switches experts."""
        starts = [0, *self.spec.step_ends()[:-1]]
        return [(start * accumulate, dict(self.spec.steps[i].mixture))
                for start, i in zip(starts, self.spec.selected(), strict=True)]

    def _enter(self, trainer: L.Trainer, module, index: int) -> None:
        """Start curriculum step `index`: the module activates its expert and applies its settings."""
        self.index, self.done = index, 0
        module.enter_curriculum_step(index, self.step, self.spec.task_experts(index))
        self._log_event(trainer, module, "enter")

    def _log_event(self, trainer: L.Trainer, module, event: str, detail: str = "") -> None:
        step = self.step
        msg = (f"curriculum: {event} step {self.index} '{step.name}' (stage {step.stage}) at global step "
               f"{trainer.global_step}{detail}: expert {module.model.newest_expert} trains, "
               f"{module.model.newest_expert} veteran(s) frozen, mixture {step.mixture}, lr {step.lr}, "
               f"rho {step.rho}, alpha {step.alpha}")
        log.info(msg)
        if trainer.is_global_zero:
            print(f"[cologen] {msg}", flush=True)

    # --------------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if stage != "fit" or not self.enabled:
            return
        dm = self._datamodule(trainer)
        tasks = dm.train_tasks if dm is not None else None
        self.spec.validate(pl_module.prw_config.num_experts, tasks, pl_module.prw_config.router.entry_warmup_steps)
        self.spec = self.spec.resolved()
        total = self.spec.total_steps()
        if trainer.max_steps in (-1, None):
            trainer.fit_loop.epoch_loop.max_steps = total
        elif trainer.max_steps != total:
            raise UsageError(f"trainer.max_steps ({trainer.max_steps}) differs from the curriculum's total for "
                             f"run_steps {self.spec.selected()} ({total}); leave trainer.max_steps unset")
        if dm is not None:
            dm.set_mixture_schedule(self.mixture_schedule(trainer.accumulate_grad_batches))

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        if not self.enabled:
            return
        if self._resumed:
            # The experts' weights and count came from the checkpoint (the optimizer and scheduler state follow
            # after this hook); re-derive which of them train. The resume is reported in `on_train_start`, once the
            # trainer's own position (global step) is restored too.
            pl_module.resume_curriculum_step(self.step, self.spec.task_experts(self.index))
            return
        first = self.spec.selected()[0]
        model = pl_module.model
        if model.num_active not in (first, first + 1) and not (first == 0 and model.num_active == 1):
            raise UsageError(
                f"curriculum starts at step {first} but the model has {model.num_active} active expert(s): "
                f"initialise it from the previous stage's checkpoint (model.init_from)")
        # Activation after the strategy wrapped the model is fine: the optimizer holds every expert from the start
        # and CurriculumDDPStrategy / the FSDP2 strategy register them all.
        self._enter(trainer, pl_module, first)

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        if self.enabled and self._resumed:
            self._log_event(trainer, pl_module, "resume", f" ({self.done} of its {self.step.steps} steps done)")

    def resume_status(self, state: dict[str, Any] | None, checkpoint: str) -> str | None:
        """Before resuming from `checkpoint` (its saved curriculum `state`): a line saying the run already finished
        (None when there is training left); a UsageError when the checkpoint is not a position of this run."""
        if not self.enabled or not state or state.get("index") is None:
            return None
        spec = CurriculumSpec(**{**state["spec"], "steps": [CurriculumStep(**s) for s in state["spec"]["steps"]]})
        index, done = int(state["index"]), int(state["done"])
        run = self.spec.selected()
        if index not in run:
            raise UsageError(f"{checkpoint} stopped in curriculum step {index} ({spec.steps[index].name}), which "
                             f"this run (curriculum.spec.run_steps {run}) does not train: resume a run with its own "
                             "last.ckpt, or start the next stage from it with model.init_from")
        if index == run[-1] and done >= self.spec.steps[index].steps:
            names = ", ".join(f"{i} {self.spec.steps[i].name}" for i in run)
            return (f"{checkpoint} has already finished this run (curriculum steps {names}; "
                    f"{self.spec.total_steps()} optimizer steps): nothing to resume")
        return None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if not self.enabled:
            return
        if self.done >= self.step.steps and self.index < self._end_of_run():
            self._enter(trainer, pl_module, self.index + 1)
        warmup = pl_module.prw_config.router.entry_warmup_steps
        if self.index > 0:
            pl_module.model.set_entry_progress(self.done / warmup if warmup > 0 else 1.0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.enabled:
            return
        if trainer.global_step != self._last_global_step:  # an optimizer step happened (gradient accumulation)
            self._last_global_step = trainer.global_step
            self.done += 1
        pl_module.log("curriculum/step", float(self.index), on_step=True, on_epoch=False, batch_size=1)

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index, "done": self.done, "last_global_step": self._last_global_step,
                "spec": asdict(self.spec)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("index") is None:
            return
        self.index, self.done = state_dict["index"], state_dict["done"]
        self._last_global_step = state_dict.get("last_global_step", -1)
        self._resumed = True
