"""ShapeWorld evaluation: every task scored against the exact ground truth of a synthetic scene.

Samples are built examples, one task each: what ``cologen.data.builders.TaskBuilder`` returns
(``task``, ``source``, ``target``, ``region``, ``meta`` with the build choices) works as is, and
so does a plain dict with the keys below (these win over ``meta``). Scores are reported as
``{task}/{metric}``, so one run over a mixed set gives every task's numbers.

- all: ``task``, ``source`` (the condition image), ``image`` or ``target``, optional ``key``.
- ``inpainting``: ``mask`` or ``region`` (the hole); for the hole's diagnostics the ``source`` (the hole as
  the model saw it) and the scene's object colours (``object_rgbs``, else ``meta["record"]``'s ``objects``).
- ``grounding``: ``overlay_rgb`` and ``box`` (one ``[x0, y0, x1, y1]``) or ``boxes`` (every
  instance); from ``meta["build"]``: ``rgb``, ``box`` (the record's box of the object, also for a
  ``mask`` overlay, whose painted pixels lie inside it), and ``boxes`` when ``overlay`` is
  ``class_boxes``. Optional ``overlay_alpha`` (1 = opaque, the builders' default). With a target,
  also ``psnr_out``: PSNR on the pixels the overlay leaves as they are (target equal to source),
  what a grounding output must copy.
- ``control``: ``source`` is the control map; optional ``condition_is_edges``.
- ``customized``: ``reference`` (or ``source``) shows the subject; ``subject_mask`` its pixels in
  the reference. Without it, a ``mask`` / ``region`` (the subject's pixels in the target, as the
  builders give) crops the template from the target: the subject as it should appear. Named
  items: ``named_colors`` (RGB) and optional ``named_shapes``; else the colours of the target
  scene's objects in ``meta["record"]`` (``objects``, or ``subject.source_objects`` when the
  builder swapped the pair; colours only: small objects are too few pixels for a shape).
- ``editing``: ``mask`` or ``region`` (the edited region), joined with every pixel where source
  and target differ (a resize blurs the edit across the stored mask's border). ``objects_kept``
  needs the source scene's object colours: ``object_rgbs``, else ``meta["record"]``'s
  ``edit.source_objects``.
- ``t2i`` (the base's text-to-image, no source): ``object_rgbs``, else the colours of ``meta["record"]``'s
  ``objects``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cologen.eval.loop import Sample
from cologen.metrics.images import to_mask
from cologen.metrics.shapeworld import (
    changed_pixels,
    control_scores,
    customized_layout_scores,
    customized_scores,
    editing_scores,
    grounding_scores,
    inpainting_scores,
    layout_iou,
    t2i_scores,
    two_subjects_scores,
)

TASKS = ("inpainting", "grounding", "control", "customized", "editing", "customized_layout", "two_subjects", "t2i")


def _first(sample: Sample, *names: str) -> Any:
    for name in names:
        if sample.get(name) is not None:
            return sample[name]
    return None


def _build(sample: Sample) -> dict[str, Any]:
    return (sample.get("meta") or {}).get("build") or {}


def _grounding(sample: Sample, output: np.ndarray) -> dict[str, float]:
    build = _build(sample)
    rgb = _first(sample, "overlay_rgb")
    rgb = build["rgb"] if rgb is None else rgb
    gt = _first(sample, "boxes", "box")
    if gt is None:
        gt = build["boxes"] if build.get("overlay") == "class_boxes" else build["box"]
    alpha = float(sample.get("overlay_alpha", 1.0))
    return grounding_scores(output, rgb, gt, source=sample["source"], target=_first(sample, "image", "target"),
                            alpha=alpha)


def _customized(sample: Sample, output: np.ndarray) -> dict[str, float]:
    build = _build(sample)
    region = _first(sample, "mask", "region")
    if build.get("subject_box") and region is not None and sample.get("named_colors") is None:
        # the target's layout is known (ShapeWorld): placement-aware scores, where a copy of the reference
        # scores near 0; subject_ncc (the reference's subject found anywhere) stays as a diagnostic
        target = _first(sample, "image", "target")
        others = [(o["rgb"], o["box"]) for o in build.get("others", []) if o.get("box")]
        scores = customized_layout_scores(output, target, region, build["subject_rgbs"], build["subject_box"],
                                          others, build.get("background_rgb"))
        scores["subject_ncc"] = customized_scores(output, target, region)["subject_ncc"]
        return scores
    colours = sample.get("named_colors")
    shapes = sample.get("named_shapes")
    if colours is None:
        record = (sample.get("meta") or {}).get("record") or {}
        objects = record.get("objects") or []
        if _build(sample).get("swapped"):  # the target is the record's source view
            objects = (record.get("subject") or {}).get("source_objects") or []
        colours, shapes = [o["rgb"] for o in objects if "rgb" in o], None
    if sample.get("subject_mask") is not None:
        reference, subject = _first(sample, "reference", "source"), sample["subject_mask"]
    elif _first(sample, "mask", "region") is not None:
        reference, subject = _first(sample, "image", "target"), _first(sample, "mask", "region")
    else:
        reference, subject = _first(sample, "reference", "source"), None
    return customized_scores(output, reference, subject, named_colors_rgb=colours or (), named_shapes=shapes)


def _editing(sample: Sample, output: np.ndarray) -> dict[str, float]:
    source, target = sample["source"], _first(sample, "image", "target")
    # Every pixel the edit changed belongs to the region, also those a resize blurred across the
    # stored mask's border, so the target itself keeps everything outside the region.
    region = changed_pixels(source, target)
    if region is None:
        raise ValueError(f"editing sample {sample.get('key')!r}: source and target differ in size")
    stored = _first(sample, "mask", "region")
    if stored is not None:
        region |= to_mask(stored, region.shape)
    objects = sample.get("object_rgbs")
    if objects is None:  # the source scene's objects, as the record stores them
        edit = ((sample.get("meta") or {}).get("record") or {}).get("edit") or {}
        objects = [o["rgb"] for o in edit.get("source_objects") or [] if "rgb" in o]
    return editing_scores(output, source, target, region, objects)


# What kind of probe a sample is, where a task has kinds: an edit's operation, grounding's overlay, control's
# condition type, inpainting's mask shape (the builders record each in the sample's meta.build)
KIND_KEYS = ("operation", "overlay", "control_type", "mask_kind")


def _object_rgbs(sample: Sample) -> list:
    """The scene's object colours: ``object_rgbs``, else those of ``meta["record"]``'s ``objects``."""
    rgbs = sample.get("object_rgbs")
    if rgbs is None:
        rgbs = [o["rgb"] for o in ((sample.get("meta") or {}).get("record") or {}).get("objects") or []]
    return list(rgbs)


def probe_kind(sample: Sample) -> str | None:
    """The sample's kind (`KIND_KEYS`, the first its build records), None where its task has none."""
    build = _build(sample)
    return next((str(build[k]) for k in KIND_KEYS if k in build), None)


def score_sample(sample: Sample, output: np.ndarray) -> dict[str, float]:
    """One sample's ShapeWorld scores, keyed ``{task}/{metric}``."""
    task = sample["task"]
    target = _first(sample, "image", "target")
    if task == "inpainting":
        scores = inpainting_scores(output, target, _first(sample, "mask", "region"), source=sample.get("source"),
                                   object_rgbs=_object_rgbs(sample))
    elif task == "grounding":
        scores = _grounding(sample, output)
    elif task == "control":
        scores = control_scores(
            output, target, sample["source"], condition_is_edges=sample.get("condition_is_edges")
        )
    elif task == "customized":
        scores = _customized(sample, output)
    elif task == "editing":
        scores = _editing(sample, output)
    elif task == "two_subjects":
        scores = two_subjects_scores(output, target, _build(sample)["subject_masks"])
    elif task == "customized_layout":  # the customized scores, and whether the layout was followed
        scores = _customized(sample, output)
        build = _build(sample)
        if build.get("subject_rgbs") and _first(sample, "mask", "region") is not None:
            scores["layout_iou"] = layout_iou(output, _first(sample, "mask", "region"), build["subject_rgbs"])
    elif task == "t2i":
        scores = t2i_scores(output, target, _object_rgbs(sample))
    else:
        raise ValueError(f"unknown ShapeWorld task {task!r}: expected one of {TASKS}")
    return {f"{task}/{k}": v for k, v in scores.items()}


class ShapeWorldScorer:
    def score(self, samples: list[Sample], outputs: list[np.ndarray]) -> list[dict[str, float]]:
        return [score_sample(s, o) for s, o in zip(samples, outputs)]

    def summary(self) -> dict[str, float]:
        return {}
