"""Metrics: ShapeWorld ground-truth scores (shapeworld.py), pixel metrics (pixel.py), edges
(edges.py), segmentation IoU (segmentation.py), pretrained-encoder similarities (similarity.py,
models.py) and FID (fid.py). Definitions: docs/metrics.md."""

from cologen.metrics.shapeworld import (
    aggregate,
    control_scores,
    customized_scores,
    editing_scores,
    grounding_scores,
    inpainting_scores,
)

__all__ = [
    "aggregate",
    "control_scores",
    "customized_scores",
    "editing_scores",
    "grounding_scores",
    "inpainting_scores",
]
