"""The task names, in one place."""

from __future__ import annotations

# The five curriculum tasks, then two that any scene yields: plain text-to-image (no source) and
# reconstruction (source = target = the scene; teaches a fresh base model to read source tokens).
CURRICULUM_TASKS: tuple[str, ...] = ("inpainting", "grounding", "control", "customized", "editing")
SCENE_TASKS: tuple[str, ...] = ("t2i", "reconstruct")
# Tasks with several condition images (docs/multi_condition.md), and the task whose stored samples each is built
# from: customized_layout is a customized pair plus a layout map of the target (where the subject goes);
# two_subjects has two stored references (ShapeWorld's opt-in task).
MULTI_CONDITION_TASKS: dict[str, str] = {"customized_layout": "customized", "two_subjects": "two_subjects"}
# appended last: a task's index seeds its data streams, so earlier tasks keep theirs
TASKS: tuple[str, ...] = CURRICULUM_TASKS + SCENE_TASKS + tuple(MULTI_CONDITION_TASKS)


def check_task(name: str) -> str:
    """Return `name` if it is a task, else raise a one-line ValueError naming it."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of: {', '.join(TASKS)}")
    return name


def stored_task(task: str) -> str:
    """The task of the stored records a task's examples are built from (itself, but for the derived tasks)."""
    return MULTI_CONDITION_TASKS.get(task, task)
