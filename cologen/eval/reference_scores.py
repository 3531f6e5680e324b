"""Cheap scores of a sampled probe against its own reference images, for real data (no metric network needed):
what the flux_dev runs log at every sampled validation (`SampleValidation(metrics='reference')`).

Per probe, as `{task}/{metric}` (NaN where a metric does not apply, which the means skip):
- every task with a target: `psnr` and `ssim` of the output against the target;
- inpainting, grounding, editing: `psnr_out`, PSNR outside the probe's region (the hole, the overlay, the edit)
  against the target, i.e. how well the untouched pixels are kept; inpainting also `psnr_in`;
- control from a canny map: `edge_f1` of the output's canny edges against the condition's (ControlNet++'s
  controllability score for canny).
The ShapeWorld metrics (`cologen/eval/shapeworld.py`) need the synthetic scenes' exact ground truth instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cologen.metrics.edges import CANNY_HIGH, CANNY_LOW, as_edge_map, canny_edges, edge_f1
from cologen.metrics.images import to_uint8_rgb
from cologen.metrics.pixel import psnr, ssim

REGION_TASKS = ("inpainting", "grounding", "editing")  # tasks whose region marks the pixels meant to change


def reference_scores(probe: dict[str, Any], output: np.ndarray) -> dict[str, float]:
    """Scores of one output (uint8 H x W x 3) against the probe's target, region and condition."""
    task, out = probe["task"], to_uint8_rgb(output)
    target = to_uint8_rgb(probe["target"])
    scores = {"psnr": psnr(out, target), "ssim": ssim(out, target)}
    region = probe.get("region")
    if task in REGION_TASKS and region is not None:
        scores["psnr_out"] = psnr(out, target, ~region)
        if task == "inpainting":
            scores["psnr_in"] = psnr(out, target, region)
    build = (probe.get("meta") or {}).get("build") or {}
    if task == "control" and build.get("control_type") == "canny" and probe.get("source") is not None:
        low, high = build.get("canny_thresholds") or (CANNY_LOW, CANNY_HIGH)
        scores["edge_f1"] = edge_f1(canny_edges(out, low, high), as_edge_map(to_uint8_rgb(probe["source"])))
    return {f"{task}/{k}": float(v) for k, v in scores.items()}
