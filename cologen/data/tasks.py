"""The task names, in one place."""

from __future__ import annotations

# The five curriculum tasks, then two that any scene yields: plain text-to-image (no source) and
# reconstruction (source = target = the scene; teaches a fresh base model to read source tokens).
CURRICULUM_TASKS: tuple[str, ...] = ("inpainting", "grounding", "control", "customized", "editing")
SCENE_TASKS: tuple[str, ...] = ("t2i", "reconstruct")
TASKS: tuple[str, ...] = CURRICULUM_TASKS + SCENE_TASKS


def check_task(name: str) -> str:
    """Return `name` if it is a task, else raise a one-line ValueError naming it."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of: {', '.join(TASKS)}")
    return name
