"""Control maps: canny computed on the fly (OpenCV), depth and segmentation from the sample, HED and
lineart from annotator models (`annotators.py`) when their local weights are configured."""

from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np

from cologen.data.annotators import ANNOTATORS, Annotator

CONTROL_TYPES: tuple[str, ...] = ("depth", "seg", "canny", "hed", "lineart")
STORED_TYPES: tuple[str, ...] = ("depth", "seg")  # read from the sample (`depth.png`, `seg.png`); the rest are computed
ANNOTATED_TYPES: tuple[str, ...] = ("hed", "lineart")
# ControlNet's canny annotator and ControlNet++'s canny data use these thresholds.
CANNY_LOW, CANNY_HIGH = 100, 200


def canny(rgb: np.ndarray, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> np.ndarray:
    """White edges on black, the ControlNet convention."""
    return cv2.Canny(rgb, low, high)


def check_annotators(types: Mapping[str, float] | list[str], weights: Mapping[str, str]) -> None:
    """A one-line error when a control type needs annotator weights that are not configured."""
    for t in types:
        if t not in CONTROL_TYPES:
            raise ValueError(f"unknown control type {t!r} in builder.control_types; known: {', '.join(CONTROL_TYPES)}")
        if t in ANNOTATED_TYPES and not weights.get(t):
            raise ValueError(f"control type {t!r} needs a local annotator checkpoint: set "
                             f"builder.annotator_weights.{t} to its path (see cologen/data/annotators.py)")


class AnnotatorCache:
    """Loads each annotator once per process, on first use (so nothing heavy is pickled into workers)."""

    def __init__(self, weights: Mapping[str, str]):
        self.weights = dict(weights)
        self._loaded: dict[str, Annotator] = {}

    def __call__(self, kind: str, rgb: np.ndarray) -> np.ndarray:
        if kind not in self._loaded:
            if not self.weights.get(kind):
                raise ValueError(f"control type {kind!r} needs builder.annotator_weights.{kind}")
            self._loaded[kind] = ANNOTATORS[kind](self.weights[kind])
        return self._loaded[kind](rgb)

    def __getstate__(self) -> dict:
        return {"weights": self.weights, "_loaded": {}}
