"""Task builders: one stored sample -> one training example (target, source, prompt, region, meta), on the fly.

Every random choice (mask kind and shape, overlay kind and colour, control type, subject-pair direction,
prompt template) is drawn here per sample, so each epoch sees new variants; kinds are dealt in exact
proportions (`choice.StratifiedChooser`, or `choice.IndexedDealer` when the caller gives the sample's index
in its stream, so that a stream can skip samples without replaying their choices). A sample is only dealt
kinds it supports: control types whose map it has, object-based masks when it has objects. The example is
in the output frame (`geometry.py`); `meta` says what was chosen and where (boxes in the output frame), so
metrics can score outputs exactly.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cologen.data.choice import IndexedDealer, StratifiedChooser, normalized
from cologen.data.control import CANNY_HIGH, CANNY_LOW, STORED_TYPES, AnnotatorCache, canny, check_annotators
from cologen.data.geometry import (
    Frame,
    box_of,
    box_visible,
    fill_polygons,
    fit_frame,
    map_box,
    map_polygon,
    mask_visible,
    output_size,
    warp,
)
from cologen.data.masks import MASK_KINDS, irregular_mask, object_shaped_mask, random_mask
from cologen.data.objects import FramedObject, framed_objects, object_mask
from cologen.data.overlays import DEFAULT_OVERLAY_COLORS, OVERLAY_KINDS, box_thickness, draw_box, paint_mask
from cologen.data.prompts import PromptTemplates, plural
from cologen.data.records import BadSample, Sample
from cologen.data.tasks import SCENE_TASKS, TASKS, check_task, stored_task

Example = dict[str, Any]


@dataclass
class BuilderConfig:
    """How the builders turn stored samples into examples. Weights need not sum to one."""

    # inpainting: the paper's proportions of random / object-shaped / irregular masks
    mask_kinds: dict[str, float] = field(default_factory=lambda: {"random": 0.2, "object": 0.4, "irregular": 0.4})
    random_mask_max_iou: float = 0.3
    irregular_points: int = 20
    object_mask_dilate: int = 1  # pixels, at most
    mask_grey: int = 128  # the value the masked area is greyed to in the source
    # grounding
    overlay_kinds: dict[str, float] = field(default_factory=lambda: {k: 1.0 for k in OVERLAY_KINDS})
    overlay_colors: dict[str, list[int]] = field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_OVERLAY_COLORS.items()})
    overlay_mask_alpha: float = 1.0
    box_thickness: int | None = None  # outline width in pixels; null: 1 px per 64 px of the shorter side, at least 1
    random_expression: bool = True  # pick among the record's equivalent unique expressions
    # control
    control_types: dict[str, float] = field(default_factory=lambda: {"depth": 1.0, "seg": 1.0, "canny": 1.0})
    canny_low: int = CANNY_LOW
    canny_high: int = CANNY_HIGH
    annotator_weights: dict[str, str] = field(default_factory=dict)  # {"hed": path, "lineart": path}
    # customized: probability of using the pair the other way round (reference <-> target)
    swap_subject_pairs: float = 0.5
    prompt_templates: dict[str, list[str]] = field(default_factory=dict)
    # refusals (skip reason `crop`): the least fraction of what an example is about that the output frame must
    # keep: the grounded object's box (and, for class boxes, every instance's), the edited region, the subject in
    # the target and in the reference; objects below it do not shape inpainting masks
    min_visible: float = 0.5
    # editing pairs without mask.png: a pixel belongs to the edit when a channel differs by more than this
    edit_change_threshold: int = 32

    def validate(self) -> None:
        for name, weights, known in (("mask_kinds", self.mask_kinds, MASK_KINDS),
                                     ("overlay_kinds", self.overlay_kinds, OVERLAY_KINDS)):
            unknown = set(weights) - set(known)
            if unknown:
                raise ValueError(f"builder.{name}: unknown {sorted(unknown)}; known: {', '.join(known)}")
            normalized(weights, f"builder.{name}")
        normalized(self.control_types, "builder.control_types")
        check_annotators([k for k, v in self.control_types.items() if v > 0], self.annotator_weights)
        if not self.overlay_colors:
            raise ValueError("builder.overlay_colors is empty")
        for name, rgb in self.overlay_colors.items():
            if len(rgb) != 3 or not all(0 <= int(c) <= 255 for c in rgb):
                raise ValueError(f"builder.overlay_colors.{name}: expected [r, g, b] in 0..255, got {rgb}")
        if not 0 <= self.swap_subject_pairs <= 1:
            raise ValueError(f"builder.swap_subject_pairs must be in [0, 1], got {self.swap_subject_pairs}")
        if self.box_thickness is not None and self.box_thickness < 1:
            raise ValueError(f"builder.box_thickness must be >= 1 or null, got {self.box_thickness}")
        if not 0 < self.overlay_mask_alpha <= 1:
            raise ValueError(f"builder.overlay_mask_alpha must be in (0, 1], got {self.overlay_mask_alpha}")
        if not 0 <= self.min_visible <= 1:
            raise ValueError(f"builder.min_visible must be in [0, 1], got {self.min_visible}")
        if not 0 <= self.edit_change_threshold < 255:
            raise ValueError(f"builder.edit_change_threshold must be in [0, 255), got {self.edit_change_threshold}")
        PromptTemplates(self.prompt_templates)


# The stored members each task's builder reads (the target image always); nothing else is decoded.
TASK_FIELDS: dict[str, frozenset[str]] = {
    "inpainting": frozenset({"instances"}),
    "grounding": frozenset({"instances"}),
    "control": frozenset({"depth", "seg"}),
    "customized": frozenset({"source", "mask", "source_mask"}),
    "customized_layout": frozenset({"source", "mask", "source_mask"}),
    "two_subjects": frozenset({"source", "instances"}),
    "editing": frozenset({"source", "mask"}),
    "t2i": frozenset(),
    "reconstruct": frozenset(),
}


def _gray_to_rgb(m: np.ndarray) -> np.ndarray:
    return np.repeat(m[..., None], 3, axis=2)


class TaskBuilder:
    """Builds examples of every task.

    Kinds (mask, overlay, control type) are dealt in exact proportions: by a `StratifiedChooser` per kind
    (and per set of kinds a sample supports) drawing from the caller's generator, or, when the caller passes
    `index` (the sample's position in its stream), by an `IndexedDealer` seeded by `deal_seed`, so that the
    choice depends on the index alone. `stratified=False` makes every choice independent of the previous
    samples (validation uses it with a per-sample seed, so each example is fixed whatever the order)."""

    def __init__(self, config: BuilderConfig | None = None, resolution: int = 32,
                 buckets: list[tuple[int, int]] | None = None, stratified: bool = True, deal_seed: int = 0):
        self.cfg = config or BuilderConfig()
        self.cfg.validate()
        self.resolution, self.buckets = resolution, buckets
        self.stratified, self.deal_seed = stratified, deal_seed
        self._choosers: dict[tuple[str, tuple[str, ...]], StratifiedChooser] = {}
        self._dealers: dict[tuple[str, tuple[str, ...]], IndexedDealer] = {}
        self._index: int | None = None  # the current sample's index in its stream (see __call__)
        self.templates = PromptTemplates(self.cfg.prompt_templates)
        self.annotators = AnnotatorCache(self.cfg.annotator_weights)
        self.color_names = sorted(self.cfg.overlay_colors)

    @staticmethod
    def fields(task: str) -> frozenset[str]:
        return TASK_FIELDS[check_task(task)]

    def frame_for(self, width: int, height: int) -> Frame:
        return fit_frame(width, height, *output_size(width, height, self.resolution, self.buckets))

    def __call__(self, sample: Sample, task: str, rng: np.random.Generator, index: int | None = None) -> Example:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}")
        if task not in SCENE_TASKS and sample.task != stored_task(task):
            raise BadSample("record", f"a {sample.task!r} record in the {task!r} stream", sample.key)
        self._index = index
        return getattr(self, f"_{task}")(sample, rng)

    # --- helpers ---------------------------------------------------------------------------------------

    def _choose(self, what: str, weights: Mapping[str, float], rng: np.random.Generator) -> str:
        """One kind among `weights` (renormalized), dealt per (what, set of kinds) in exact proportions."""
        key = (what, tuple(sorted(k for k, w in weights.items() if w > 0)))
        if not self.stratified:
            return StratifiedChooser(weights, stratified=False).draw(rng)
        if self._index is None:
            if key not in self._choosers:
                self._choosers[key] = StratifiedChooser(weights)
            return self._choosers[key].draw(rng)
        if key not in self._dealers:
            self._dealers[key] = IndexedDealer(weights, self.deal_seed ^ zlib.crc32(repr(key).encode()))
        return self._dealers[key].at(self._index)

    def _start(self, sample: Sample, task: str, image: np.ndarray | None = None) -> tuple[Frame, Example]:
        image = sample.image if image is None else image
        frame = self.frame_for(image.shape[1], image.shape[0])
        ex: Example = {"key": sample.key, "task": task, "target": warp(image, frame), "source": None,
                       "region": None, "prompt": "",
                       "meta": {"record": sample.record, "build": {}, "frame": frame.as_dict()}}
        return frame, ex

    def _objects(self, sample: Sample, frame: Frame, ex: Example) -> list[FramedObject]:
        inst = warp(sample.instances, frame, nearest=True) if sample.instances is not None else None
        objs = framed_objects(sample.record, frame, inst)
        ex["meta"]["build"]["object_boxes"] = {o.index: o.box for o in objs}
        return objs

    def _refuse_unless_visible(self, fraction: float, what: str, frame: Frame, key: str) -> None:
        """Refuse (`crop`) an example whose frame keeps less than `min_visible` of what it is about."""
        if fraction < self.cfg.min_visible:
            raise BadSample("crop", f"{what}: {fraction:.0%} of it inside the {frame.width}x{frame.height} frame "
                            f"(min_visible {self.cfg.min_visible:g})", key)

    @staticmethod
    def _caption(sample: Sample) -> str:
        return sample.record.get("caption") or sample.record["prompt"]

    # --- tasks -----------------------------------------------------------------------------------------

    def _t2i(self, sample: Sample, rng: np.random.Generator) -> Example:
        _, ex = self._start(sample, "t2i")
        ex["prompt"] = self.templates.render("t2i", rng, {"caption": self._caption(sample)}, sample.key)
        return ex

    def _reconstruct(self, sample: Sample, rng: np.random.Generator) -> Example:
        _, ex = self._start(sample, "reconstruct")
        ex["source"] = ex["target"].copy()
        ex["prompt"] = self.templates.render("reconstruct", rng, {"caption": self._caption(sample)}, sample.key)
        return ex

    def _inpainting(self, sample: Sample, rng: np.random.Generator) -> Example:
        frame, ex = self._start(sample, "inpainting")
        objs = self._objects(sample, frame, ex)
        build = ex["meta"]["build"]
        # an object the crop cuts to a sliver does not shape a mask (its masked area would show nothing of it)
        shapers = [o for o in objs if not frame.crops or "box" not in o.record
                   or box_visible(o.record["box"], frame) >= self.cfg.min_visible]
        if shapers:
            kind = self._choose("mask", self.cfg.mask_kinds, rng)
        else:  # object and irregular masks are shaped on an object: without one, a random mask
            kind = "random"
            build["mask_fallback"] = "objects cropped" if objs else "no objects"
        build["mask_kind"] = kind
        w, h = frame.width, frame.height
        if kind == "random":
            mask, info = random_mask(rng, w, h, [o.mask for o in objs], self.cfg.random_mask_max_iou)
            build.update(info)
        else:
            obj = shapers[int(rng.integers(len(shapers)))]
            build["object_index"] = obj.index
            if kind == "object":
                mask = object_shaped_mask(rng, obj.mask, self.cfg.object_mask_dilate)
            else:
                mask, pts = irregular_mask(rng, obj.box, w, h, self.cfg.irregular_points)
                build["points"] = pts.round(2).tolist()
        build["mask_box"] = box_of(mask)
        if build["mask_box"] is None:
            raise BadSample("crop", "the inpainting mask is empty in the frame", sample.key)
        source = ex["target"].copy()
        source[mask.astype(bool)] = self.cfg.mask_grey
        ex.update(source=source, region=mask.astype(np.uint8))
        ex["prompt"] = self.templates.render("inpainting", rng, {"caption": self._caption(sample)}, sample.key)
        return ex

    def _grounded_mask(self, sample: Sample, frame: Frame, index: int | None, polygon, box) -> np.ndarray:
        inst = warp(sample.instances, frame, nearest=True) if sample.instances is not None else None
        if index is not None and (inst is not None or sample.record.get("objects")):
            m = object_mask(sample.record, index, frame, inst)
            if m is not None and m.any():
                return m
        if polygon:
            return fill_polygons([map_polygon(p, frame) for p in polygon], frame.width, frame.height)
        m = np.zeros((frame.height, frame.width), np.uint8)
        m[box[1]:box[3], box[0]:box[2]] = 1
        return m

    def _grounding(self, sample: Sample, rng: np.random.Generator) -> Example:
        frame, ex = self._start(sample, "grounding")
        g = sample.record.get("grounding")
        if not isinstance(g, dict) or "expression" not in g:
            raise BadSample("record", "grounding sample without a grounding block and expression", sample.key)
        self._refuse_unless_visible(box_visible(g["box"], frame), "the grounded object", frame, sample.key)
        box = map_box(g["box"], frame)
        if box is None:
            raise BadSample("crop", "the grounded object is cropped away", sample.key)
        kind = self._choose("overlay", self.cfg.overlay_kinds, rng)
        color = self.color_names[int(rng.integers(len(self.color_names)))]
        rgb = [int(c) for c in self.cfg.overlay_colors[color]]
        exprs = g.get("expressions") or [g["expression"]]
        expression = exprs[int(rng.integers(len(exprs)))] if self.cfg.random_expression else g["expression"]
        cls = g.get("class") or "object"
        index = g.get("object_index")
        mask = self._grounded_mask(sample, frame, index, g.get("polygon"), box)
        target = ex["target"].copy()
        t = self.cfg.box_thickness or box_thickness(frame.width, frame.height)
        build = ex["meta"]["build"]
        build.update(overlay=kind, color=color, rgb=rgb, expression=expression, box=box, object_index=index,
                     thickness=t)
        if kind == "box":
            draw_box(target, box, rgb, t)
            region = mask
        elif kind == "mask":
            paint_mask(target, mask, rgb, self.cfg.overlay_mask_alpha)
            region = mask
        else:  # class_boxes: every instance of the class
            stored = g.get("instances") or [g["box"]]
            for b in stored:  # a sliver of an instance makes "every instance" ambiguous; one wholly outside does not
                visible = box_visible(b, frame)
                if 0 < visible < self.cfg.min_visible:
                    self._refuse_unless_visible(visible, "an instance of the class", frame, sample.key)
            boxes = [b for b in (map_box(b, frame) for b in stored) if b is not None]
            region = np.zeros_like(mask)
            for b in boxes:
                draw_box(target, b, rgb, t)
            indices = g.get("instance_indices")
            for j in indices if indices is not None else []:
                m = self._grounded_mask(sample, frame, j, None, box)
                region |= m
            if indices is None:
                for b in boxes:
                    region[b[1]:b[3], b[0]:b[2]] = 1
            build["boxes"] = boxes
        ex.update(source=ex["target"], target=target, region=region.astype(np.uint8))
        fields = {"expression": expression, "color": color, "class": cls,
                  "class_plural": g.get("class_plural") or plural(cls)}
        ex["prompt"] = self.templates.render(f"grounding/{kind}", rng, fields, sample.key)
        return ex

    def _control(self, sample: Sample, rng: np.random.Generator) -> Example:
        frame, ex = self._start(sample, "control")
        configured = {k: w for k, w in self.cfg.control_types.items() if w > 0}
        usable = {k: w for k, w in configured.items() if k not in STORED_TYPES or getattr(sample, k) is not None}
        if not usable:
            raise BadSample("missing", f"none of the control types {sorted(configured)} fits this sample: "
                            f"{' and '.join(f'{k} needs {k}.png' for k in configured)}", sample.key)
        kind = self._choose("control", usable, rng)
        build = ex["meta"]["build"]
        build["control_type"] = kind
        if kind in STORED_TYPES:
            stored = getattr(sample, kind)
            mapped = warp(stored, frame, nearest=kind == "seg")
            source = _gray_to_rgb(mapped) if mapped.ndim == 2 else mapped
        elif kind == "canny":
            build["canny_thresholds"] = [self.cfg.canny_low, self.cfg.canny_high]
            source = _gray_to_rgb(canny(ex["target"], self.cfg.canny_low, self.cfg.canny_high))
        else:
            source = _gray_to_rgb(self.annotators(kind, ex["target"]))
        ex["source"] = np.ascontiguousarray(source)
        ex["prompt"] = self.templates.render("control", rng, {"caption": self._caption(sample)}, sample.key)
        return ex

    def _customized(self, sample: Sample, rng: np.random.Generator) -> Example:
        if sample.source is None:
            raise BadSample("missing", "customized sample without source.png (the subject reference)", sample.key)
        subject = sample.record.get("subject") or {}
        # stored further conditions (a depth map of the target, ...) belong to the target view: no swap then
        swap = (bool(subject.get("source_description")) and not sample.extra_sources
                and rng.random() < self.cfg.swap_subject_pairs)
        image, reference = (sample.source, sample.image) if swap else (sample.image, sample.source)
        region = sample.source_mask if swap else sample.mask
        frame, ex = self._start(sample, "customized", image)
        ex["source"] = warp(reference, frame)  # refitted to the output size if the reference differs
        if region is not None:
            self._refuse_unless_visible(mask_visible(region > 0, frame), "the subject in the target", frame,
                                        sample.key)
            ex["region"] = (warp(region, frame, nearest=True) > 0).astype(np.uint8)
        reference_region = sample.mask if swap else sample.source_mask
        if reference_region is not None:  # the reference is fitted to the same frame size
            self._refuse_unless_visible(mask_visible(reference_region > 0, frame), "the subject in the reference",
                                        frame, sample.key)
        description = subject["source_description"] if swap else (
            subject.get("target_description") or sample.record["prompt"])
        ex["meta"]["build"].update(swapped=swap, subject_id=subject.get("id"), description=description,
                                   **self._target_layout(sample.record, swap, frame))
        ex["prompt"] = self.templates.render("customized", rng, {"description": description}, sample.key)
        if sample.extra_sources:  # stored further conditions, in the target's frame
            ex["extra_sources"] = [np.ascontiguousarray(warp(x, frame)) for x in sample.extra_sources]
            ex["meta"]["build"]["roles"] = [c["role"] for c in sample.record.get("conditions") or []] or None
        return ex

    def _customized_layout(self, sample: Sample, rng: np.random.Generator) -> Example:
        """A customized pair with a second condition: the layout, the subject's box in the target filled white on
        black (where to put the subject; its shape and pattern come from the reference)."""
        ex = self._customized(sample, rng)
        if ex["region"] is None or not ex["region"].any():
            raise BadSample("missing", "customized_layout needs the subject's mask in the target (mask.png)",
                            sample.key)
        x0, y0, x1, y1 = box_of(ex["region"])
        layout = np.zeros_like(ex["target"])
        layout[y0:y1, x0:x1] = 255
        ex["task"] = "customized_layout"
        ex["extra_sources"] = [layout]  # conditions after the first ("source")
        ex["meta"]["build"]["roles"] = ["subject", "layout"]
        ex["prompt"] = self.templates.render("customized_layout", rng,
                                             {"description": ex["meta"]["build"]["description"]}, sample.key)
        return ex

    def _two_subjects(self, sample: Sample, rng: np.random.Generator) -> Example:
        """Two references (`source`, `source.1`), a scene with both: the subjects' pixels in the target are the
        region; their boxes and colours, in the output frame, are the metric's ground truth."""
        if sample.source is None or len(sample.extra_sources) != 1:
            raise BadSample("missing", "two_subjects needs source.png and source.1.png (one reference each)",
                            sample.key)
        frame, ex = self._start(sample, "two_subjects")
        objects = self._objects(sample, frame, ex)
        subjects = [o for o in objects if o.record.get("subject_id")]
        if len(subjects) != 2 or any(o.mask is None or not o.mask.any() for o in subjects):
            raise BadSample("crop", "two_subjects: both subjects must be inside the frame", sample.key)
        ex["source"] = np.ascontiguousarray(warp(sample.source, frame))
        ex["extra_sources"] = [np.ascontiguousarray(warp(sample.extra_sources[0], frame))]
        ex["region"] = (subjects[0].mask | subjects[1].mask).astype(np.uint8)
        ex["meta"]["build"].update(roles=["subject", "subject"],
                                   subject_masks=[o.mask for o in subjects], subject_boxes=[o.box for o in subjects],
                                   subject_rgbs=[o.record["rgbs"] for o in subjects])
        ex["prompt"] = self.templates.render("two_subjects", rng, {"caption": self._caption(sample)}, sample.key)
        return ex

    def _edit_region(self, sample: Sample) -> np.ndarray:
        """The stored pair's edited pixels: mask.png, else where source and target differ (JPEG noise aside)."""
        if sample.mask is not None and sample.mask.any():
            return sample.mask > 0
        if sample.source.shape != sample.image.shape:
            return np.zeros(sample.image.shape[:2], bool)  # nothing to compare pixel for pixel
        diff = np.abs(sample.image.astype(np.int16) - sample.source.astype(np.int16)).max(axis=2)
        return diff > self.cfg.edit_change_threshold

    @staticmethod
    def _target_layout(record: Mapping[str, Any], swap: bool, frame: Frame) -> dict[str, Any]:
        """What the target view's prompt names, in the output frame, for placement-aware metrics: the subject's
        box and colours, the other objects' colours and boxes, the background colour (records that carry them)."""
        subject = record.get("subject") or {}
        objects = (subject.get("source_objects") if swap else record.get("objects")) or []
        background = (subject.get("source_background") if swap else record.get("background")) or {}
        layout: dict[str, Any] = {}
        main = [o for o in objects if o.get("subject_id")]
        if main and main[0].get("rgbs") and main[0].get("box"):
            layout["subject_box"] = map_box(main[0]["box"], frame)
            layout["subject_rgbs"] = main[0]["rgbs"]
            layout["others"] = [{"rgb": o["rgb"], "box": map_box(o["box"], frame)} for o in objects
                                if not o.get("subject_id") and o.get("rgb") and o.get("box")]
        if background.get("rgb"):
            layout["background_rgb"] = list(background["rgb"])
        return layout

    def _editing(self, sample: Sample, rng: np.random.Generator) -> Example:
        if sample.source is None:
            raise BadSample("missing", "editing sample without source.png (the image before the edit)", sample.key)
        frame, ex = self._start(sample, "editing")
        if frame.crops:
            self._refuse_unless_visible(mask_visible(self._edit_region(sample), frame), "the edit", frame,
                                        sample.key)
        ex["source"] = warp(sample.source, frame)
        if sample.mask is not None:
            ex["region"] = (warp(sample.mask, frame, nearest=True) > 0).astype(np.uint8)
        edit = sample.record.get("edit") or {}
        instruction = edit.get("instruction") or sample.record["prompt"]
        ex["meta"]["build"].update(operation=edit.get("operation"), region_box=box_of(ex["region"])
                                   if ex["region"] is not None else None)
        ex["prompt"] = self.templates.render("editing", rng, {"instruction": instruction}, sample.key)
        return ex
