"""The curriculum spec: an ordered list of steps, each one task (mixture) with its own expert, length and losses.

Implements method.md, "Curriculum: five steps in three stages"; `validate` refuses a spec whose steps are
shorter than the router's entry warm-up needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from itertools import accumulate

from cologen.data.tasks import TASKS
from cologen.errors import UsageError


@dataclass
class CurriculumStep:
    """One curriculum step: trains one new expert (veterans frozen) on a data mixture.

    name: a label for logs ('inpainting').
    stage: the paper's stage (1 endogenous pre-training, 2 condition injection, 3 instruction-image alignment).
    mixture: task -> weight; earlier tasks with a small weight are the optional replay share.
    steps: length in optimizer steps.
    lr / router_lr: learning rates of the new expert and of the routers (router_lr null: lr / 2).
    rho / alpha: the veteran loss's target usage of the newest expert and its weight.
    reset_schedule: restart the learning-rate warmup/schedule at the start of this step.
    """

    name: str
    mixture: dict[str, float]
    steps: int
    stage: int = 1
    lr: float = 1e-4
    router_lr: float | None = None
    rho: float = 0.8
    alpha: float = 0.5
    reset_schedule: bool = True


@dataclass
class CurriculumSpec:
    """The whole curriculum and the part of it one run executes (`run_steps`: indices; null runs all).

    Two switches change every step at once (for ablations, so they need no copy of the step list):
    veteran_alpha: when set, the veteran loss weight of every step after the first.
    replay: false trains each step only on the tasks it introduces (drops the replay shares of earlier tasks).
    """

    steps: list[CurriculumStep] = field(default_factory=list)
    run_steps: list[int] | None = None
    veteran_alpha: float | None = None
    replay: bool = True

    def resolved(self) -> CurriculumSpec:
        """This spec with `veteran_alpha` and `replay` applied to its steps (and reset, so resolving is idempotent)."""
        owners = self.task_experts(len(self.steps) - 1) if self.steps else {}
        steps = []
        for i, step in enumerate(self.steps):
            changes = {}
            if self.veteran_alpha is not None and i > 0:
                changes["alpha"] = self.veteran_alpha
            if not self.replay:
                changes["mixture"] = {t: w for t, w in step.mixture.items() if owners.get(t) == i}
            steps.append(replace(step, **changes))
        return CurriculumSpec(steps, None if self.run_steps is None else list(self.run_steps))

    def selected(self) -> list[int]:
        return list(range(len(self.steps))) if self.run_steps is None else list(self.run_steps)

    def task_experts(self, upto: int) -> dict[str, int]:
        """Task -> expert for curriculum steps 0..upto: a task belongs to the expert of the first step that mixes
        it in (a later step's replay of it stays with that expert)."""
        owners: dict[str, int] = {}
        for i in range(upto + 1):
            for task, weight in self.steps[i].mixture.items():
                if weight > 0:
                    owners.setdefault(task, i)
        return owners

    def validate(self, num_experts: int, available_tasks: list[str] | None = None,
                 entry_warmup_steps: int = 0) -> None:
        """Fail with one line naming the field before training starts. A step after the first must be at least
        twice `entry_warmup_steps` (the router's entry anneal) long, so its expert is routed for as long as the
        anneal took."""
        if not self.steps:
            raise UsageError("curriculum.steps is empty")
        if self.veteran_alpha is not None and self.veteran_alpha < 0:
            raise UsageError(f"curriculum.veteran_alpha must be >= 0, got {self.veteran_alpha}")
        if len(self.steps) > num_experts:
            raise UsageError(f"curriculum.steps has {len(self.steps)} steps but model.prw.num_experts is "
                             f"{num_experts}: allocate one expert per step")
        for i, step in enumerate(self.steps):
            where = f"curriculum.steps[{i}] ({step.name})"
            if step.steps <= 0:
                raise UsageError(f"{where}.steps must be > 0, got {step.steps}")
            if i > 0 and step.steps < 2 * entry_warmup_steps:
                raise UsageError(f"{where}.steps ({step.steps}) must be >= 2 x prw.router.entry_warmup_steps "
                                 f"({entry_warmup_steps}): the new expert's router entry anneals over the warm-up, "
                                 "and the step must route to it for at least as long; lengthen the step or shorten "
                                 "the warm-up")
            if not step.mixture:
                raise UsageError(f"{where}.mixture is empty")
            for task, weight in step.mixture.items():
                if task not in TASKS:
                    raise UsageError(f"{where}.mixture has unknown task {task!r}; known tasks: {', '.join(TASKS)}")
                if weight < 0:
                    raise UsageError(f"{where}.mixture[{task}] is negative ({weight})")
                if available_tasks is not None and weight > 0 and task not in available_tasks:
                    raise UsageError(f"{where}.mixture uses {task!r} but the data has no train_shards for it")
            if sum(step.mixture.values()) <= 0:
                raise UsageError(f"{where}.mixture weights must sum to a positive number")
            if step.lr <= 0:
                raise UsageError(f"{where}.lr must be > 0, got {step.lr}")
            if not 0.0 <= step.rho <= 1.0:
                raise UsageError(f"{where}.rho must be in [0, 1], got {step.rho}")
            if step.alpha < 0:
                raise UsageError(f"{where}.alpha must be >= 0, got {step.alpha}")
        run = self.selected()
        if not run:
            raise UsageError("curriculum.run_steps is empty")
        if any(not 0 <= i < len(self.steps) for i in run):
            raise UsageError(f"curriculum.run_steps {run} must index curriculum.steps (0..{len(self.steps) - 1})")
        if run != list(range(run[0], run[-1] + 1)):
            raise UsageError(f"curriculum.run_steps {run} must be consecutive and increasing")

    def total_steps(self) -> int:
        return sum(self.steps[i].steps for i in self.selected())

    def step_ends(self) -> list[int]:
        """The run's optimizer step at the end of each selected curriculum step (where a run samples and swaps)."""
        return list(accumulate(self.steps[i].steps for i in self.selected()))
