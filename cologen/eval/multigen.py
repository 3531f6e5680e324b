"""MultiGen-20M eval (controllable generation), one condition type per run.

Every image (output, ground truth, condition) is first resized to ``resolution`` x
``resolution`` (bicubic; label maps nearest), as the benchmark does (512). Per condition:

- ``canny``: ``edge_f1`` between Canny(output) and the condition (Canny(ground truth) when the
  sample has no ``condition``), thresholds 100 / 200, pixel tolerance ``edge_tolerance``;
  ``clip_score`` = 100 * max(cosine, 0) of output and prompt (needs ``clip_path``).
- ``depth``: ``depth_rmse`` (0-255 units) between the depth network's map of the output and the
  sample's ``depth`` (or the network's map of the ground truth); needs ``depth_path``.
- ``hed`` / ``lineart``: ``ssim`` between the detector's map of the output and of the ground
  truth (or the sample's ``condition``); needs ``hed_path`` / ``lineart_path``.
- ``seg``: ``miou`` between the segmenter's labels of the output and the sample's ``seg_map``;
  the summary's ``miou`` is dataset-level (one confusion matrix over all images), the JSONL's is
  per image; needs ``segmenter_path``.

``clip_score`` is added for the other conditions too when ``clip_path`` is given, and ``fid``
(outputs vs ground-truth images) when ``fid_features`` is given (a path or an ``nn.Module``).

Sample keys: ``image`` (ground truth), ``prompt`` (caption, given to ``generate``; ``text`` is
accepted as MultiGen's column name), optional ``condition`` (the control map), ``depth``,
``seg_map`` (label ids, single channel), ``key``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from PIL import Image

from cologen.eval.loop import Sample
from cologen.metrics.edges import as_edge_map, canny_edges, edge_f1
from cologen.metrics.fid import FeatureLike, fid_update, make_fid
from cologen.metrics.images import resize, to_gray, to_uint8_rgb
from cologen.metrics.models import (
    PathLike,
    load_clip,
    load_depth_model,
    load_map_detector,
    load_segmenter,
    require_path,
)
from cologen.metrics.pixel import rmse, ssim
from cologen.metrics.segmentation import ConfusionMatrix
from cologen.metrics.similarity import clip_score_100, clip_text_score

Condition = Literal["canny", "depth", "hed", "lineart", "seg"]
CONDITIONS: tuple[str, ...] = ("canny", "depth", "hed", "lineart", "seg")


def _prompt(sample: Sample) -> str:
    return str(sample.get("prompt", sample.get("text", "")))


def _label_map(value: object) -> np.ndarray:
    if isinstance(value, Image.Image):
        return np.asarray(value if value.mode in ("L", "I", "P") else value.convert("L"))
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().squeeze()
    arr = np.asarray(value)
    return arr[..., 0] if arr.ndim == 3 else arr


class MultiGenScorer:
    def __init__(
        self,
        condition: Condition,
        *,
        clip_path: PathLike | None = None,
        depth_path: PathLike | None = None,
        segmenter_path: PathLike | None = None,
        hed_path: PathLike | Callable[[torch.Tensor], torch.Tensor] | None = None,
        lineart_path: PathLike | Callable[[torch.Tensor], torch.Tensor] | None = None,
        fid_features: FeatureLike = None,
        resolution: int | None = 512,
        edge_tolerance: float = 0.0,
        ignore_index: int = 255,
        reduce_zero_label: bool = False,
        device: str | torch.device | None = None,
    ) -> None:
        if condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
        self.condition = condition
        self.resolution = resolution
        self.edge_tolerance = edge_tolerance
        self.ignore_index = ignore_index
        self.reduce_zero_label = reduce_zero_label
        if condition == "canny":
            require_path(clip_path, "clip_path")  # CLIP-score is part of the canny protocol
        self.clip = load_clip(clip_path, device) if clip_path is not None else None
        self.depth = load_depth_model(depth_path, device) if condition == "depth" else None
        self.segmenter = load_segmenter(segmenter_path, device) if condition == "seg" else None
        self.detector = None
        if condition in ("hed", "lineart"):
            field = f"{condition}_path"
            self.detector = load_map_detector(hed_path if condition == "hed" else lineart_path, field, device)
        self.confusion = ConfusionMatrix(self.segmenter.num_classes, ignore_index) if self.segmenter else None
        self.fid = make_fid(fid_features, device) if fid_features is not None else None

    def _img(self, image: object) -> np.ndarray:
        arr = to_uint8_rgb(image)  # type: ignore[arg-type]
        return arr if self.resolution is None else resize(arr, (self.resolution, self.resolution))

    def _map(self, value: object, labels: bool = False, nearest: bool = False) -> np.ndarray:
        """A single-channel map at the eval resolution: label ids (``labels``) or grey values."""
        arr = _label_map(value) if labels else to_gray(value)  # type: ignore[arg-type]
        if self.resolution is None:
            return arr
        interp = Image.NEAREST if (labels or nearest) else Image.BICUBIC
        return resize(arr, (self.resolution, self.resolution), interp)

    def score(self, samples: list[Sample], outputs: list[np.ndarray]) -> list[dict[str, float]]:
        outs = [self._img(o) for o in outputs]
        gts = [self._img(s["image"]) for s in samples]
        rows: list[dict[str, float]] = [{} for _ in samples]
        if self.condition == "canny":
            for row, o, gt, s in zip(rows, outs, gts, samples):
                ref = (
                    as_edge_map(self._map(s["condition"], nearest=True))
                    if s.get("condition") is not None
                    else canny_edges(gt)
                )
                row["edge_f1"] = edge_f1(canny_edges(o), ref, self.edge_tolerance)
        elif self.condition == "depth":
            pred = self.depth(outs)  # type: ignore[misc]
            missing = [i for i, s in enumerate(samples) if s.get("depth") is None]
            from_gt = dict(zip(missing, self.depth([gts[i] for i in missing]))) if missing else {}  # type: ignore[misc]
            for i, (row, p) in enumerate(zip(rows, pred)):
                ref = from_gt[i] if i in from_gt else self._map(samples[i]["depth"]).astype(np.float64)
                row["depth_rmse"] = rmse(p, ref)
        elif self.condition in ("hed", "lineart"):
            pred = self.detector(outs)  # type: ignore[misc]
            for row, p, gt, s in zip(rows, pred, gts, samples):
                ref = self._map(s["condition"]) if s.get("condition") is not None else self.detector([gt])[0]  # type: ignore[misc]
                row["ssim"] = ssim(p, ref)
        else:
            pred = self.segmenter(outs)  # type: ignore[misc]
            for row, p, s in zip(rows, pred, samples):
                gt = self._map(s["seg_map"], labels=True).astype(np.int64)
                if self.reduce_zero_label:  # ADE20K: id 0 is "other", ignored; classes shift down by one
                    gt = np.where(gt == 0, self.ignore_index, gt - 1)
                row["miou"] = self.confusion.update(p, gt)  # type: ignore[union-attr]
        if self.clip is not None:
            for row, v in zip(rows, clip_text_score(outs, [_prompt(s) for s in samples], self.clip)):
                row["clip_score"] = float(clip_score_100(v))
        if self.fid is not None:
            fid_update(self.fid, gts, real=True)
            fid_update(self.fid, outs, real=False)
        return rows

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.confusion is not None:
            out["miou"] = self.confusion.miou()
        if self.fid is not None:
            out["fid"] = float(self.fid.compute())
        return out
