"""Prompt templates per task (and per grounding overlay kind), filled from the record and the builder's choices.

A template is a `str.format` string; one is picked at random per sample. Override or extend them with
`BuilderConfig.prompt_templates` (same keys). Text dropout is *not* applied here: the LightningModule
drops prompts (and sources) at training time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cologen.data.records import BadSample

DEFAULT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "inpainting": ("{caption}",),
    "control": ("{caption}",),
    "t2i": ("{caption}",),
    "reconstruct": ("{caption}",),
    "customized": ("{description}",),
    "customized_layout": ("{description}",),
    "two_subjects": ("{caption}",),
    "editing": ("{instruction}",),
    "grounding/box": (
        "draw a {color} box around {expression}",
        "mark {expression} with a {color} box",
        "put a {color} bounding box on {expression}",
    ),
    "grounding/mask": (
        "paint {expression} {color}",
        "fill {expression} with {color}",
        "cover {expression} with a {color} mask",
    ),
    "grounding/class_boxes": (
        "draw {color} boxes around every {class}",
        "mark all the {class_plural} with {color} boxes",
        "put a {color} box on each {class}",
    ),
}


def plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")


class PromptTemplates:
    def __init__(self, overrides: Mapping[str, Sequence[str]] | None = None):
        self.templates = {k: tuple(v) for k, v in DEFAULT_TEMPLATES.items()}
        for k, v in (overrides or {}).items():
            if k not in self.templates:
                raise ValueError(f"builder.prompt_templates: unknown key {k!r}; known: {', '.join(self.templates)}")
            if not v:
                raise ValueError(f"builder.prompt_templates.{k} is empty")
            self.templates[k] = tuple(v)

    def render(self, key: str, rng: np.random.Generator, fields: Mapping[str, Any], sample_key: str = "?") -> str:
        options = self.templates[key]
        template = options[int(rng.integers(len(options)))] if len(options) > 1 else options[0]
        try:
            return template.format_map(dict(fields)).strip()
        except KeyError as e:
            raise BadSample("build", f"prompt template {template!r} needs {e.args[0]!r}, absent here", sample_key) from None
