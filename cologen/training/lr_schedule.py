"""The learning-rate schedule (optim.schedule): a linear warmup, then constant or cosine, with an origin the
curriculum moves to restart it at a step boundary (`CoLoGenModule.set_learning_rates`).

A callable object rather than a closure: LambdaLR saves its `__dict__` in the checkpoint, so a resumed run continues
the same schedule.
"""

from __future__ import annotations

import math


class LRSchedule:
    """The multiplier of the base learning rate at an optimizer step: `kind` 'constant' or 'cosine' (down to
    `min_ratio` over `total_steps`) after `warmup_steps` of linear warmup, counted from `origin`."""

    def __init__(self, warmup_steps: int = 0, kind: str = "constant", total_steps: int = 0,
                 min_ratio: float = 0.0):
        self.warmup_steps = warmup_steps
        self.kind = kind
        self.total_steps = total_steps
        self.min_ratio = min_ratio
        self.origin = 0  # optimizer step at which the schedule (re)starts

    def restart(self, step: int, total_steps: int | None = None) -> None:
        self.origin = step
        if total_steps is not None:
            self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        s = max(step - self.origin, 0)
        if self.warmup_steps and s < self.warmup_steps:
            return (s + 1) / self.warmup_steps
        if self.kind == "cosine" and self.total_steps > 0:
            progress = min((s - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0
