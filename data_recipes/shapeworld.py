"""ShapeWorld: a deterministic, seeded generator of synthetic scenes with exact ground truth for every task.

A scene is a few flat shapes (kind, colour, size, depth) on a plain or textured background. From scenes the
generator writes webdataset shards (the format of `docs/data.md`) for the five CoLoGen tasks:

* inpainting: scene + objects (boxes, polygons, instance map); masks are drawn on the fly by the builders;
* grounding: scene + a unique referring expression ("the small red triangle"), its box, mask and class boxes;
* control: scene + depth map + segmentation map (canny is computed on the fly);
* customized: one patterned "subject" from a fixed pool rendered in two scenes (a Subjects200K-like pair);
* editing: source and target scenes for recolour / remove / add / move / resize, with the edited region.

Every sample is drawn from its own generator seeded by (seed, task, split, index), and tar members carry
fixed metadata, so the same seed gives byte-identical shards whatever the number of processes.

    python -m data_recipes.shapeworld --out data/shapeworld --train 2000 --val 256 --seed 0
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cologen.data.manifest import ShardWriter, describe, keys_in_tar, manifest_path, write_manifest
from data_recipes._images import encode_png
from data_recipes._writer import run_jobs

FORMAT_VERSION = 2  # 2: customized subjects at their named cell and size, backgrounds with their RGB
MANIFEST = "shapeworld.json"
TASKS = ("inpainting", "grounding", "control", "customized", "editing")
# Opt-in (`--tasks ... two_subjects`, not in the default dataset): two subject references, one scene with both
# (docs/multi_condition.md). Appended: a task's index seeds its samples.
EXTRA_TASKS = ("two_subjects",)
SPLITS = ("train", "val")
EDIT_OPERATIONS = ("recolor", "remove", "add", "move", "resize")
SUBJECT_PATTERNS = ("split_v", "split_h", "ring", "quadrants", "stripes", "diagonal")

# Object colours are saturated; backgrounds are muted; grounding overlays (cyan, magenta, white, in
# cologen/data) appear in neither, so "a cyan box" is never confused with an object.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "purple": (140, 60, 200),
    "brown": (130, 80, 40),
    "black": (25, 25, 25),
    "pink": (255, 150, 190),
}
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "beige": (180, 170, 140),
    "slate": (90, 100, 120),
}
TEXTURES = ("plain", "striped", "checkered", "dotted", "mottled")
# Segmentation map colours per class (the `seg.png` legend, also stored in each control record).
SEG_PALETTE: dict[str, tuple[int, int, int]] = {
    "background": (0, 0, 0),
    "circle": (220, 20, 60),
    "square": (60, 180, 75),
    "triangle": (255, 225, 25),
    "diamond": (0, 130, 200),
    "cross": (245, 130, 48),
    "star": (145, 30, 180),
    "hexagon": (70, 240, 240),
    "subject": (255, 255, 255),
}
SHAPES_ALL = ("circle", "square", "triangle", "diamond", "cross", "star", "hexagon")


@dataclass
class ShapeWorldConfig:
    """Everything that sets how hard the scenes are; `PRESETS["hard"]` is one flag away."""

    size: int = 32
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
    colors: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple")
    # object diameter as a fraction of the image side, per size word
    sizes: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {"small": (0.20, 0.24), "medium": (0.30, 0.35), "large": (0.42, 0.48)}
    )
    min_objects: int = 1
    max_objects: int = 3
    textures: tuple[str, ...] = TEXTURES
    background_colors: tuple[str, ...] = ("grey", "beige", "slate")
    min_visible: float = 0.6  # fraction of an object's pixels that must stay unoccluded
    num_subjects: int = 64  # size of the fixed subject pool of the customized task
    subject_shapes: tuple[str, ...] = ("circle", "square", "diamond", "triangle")
    subject_patterns: tuple[str, ...] = SUBJECT_PATTERNS
    # A subject's diameter per size word. Its centre is the centre of the cell the prompt names (clamped inside
    # the image), so the prompt fixes where and how large the subject must be drawn.
    subject_sizes: dict[str, float] = field(default_factory=lambda: {"small": 0.34, "large": 0.46})
    subject_cell_distance: int = 2  # Manhattan distance between the subject's cells in the two views, at least
    subject_seed: int = 1234  # the pool does not depend on the data seed
    max_distractors: int = 2  # plain shapes next to a subject, named with their position
    edit_operations: tuple[str, ...] = EDIT_OPERATIONS
    shard_size: int = 250
    tasks: tuple[str, ...] = TASKS

    def __post_init__(self) -> None:
        for s in self.shapes + self.subject_shapes:
            if s not in SHAPES_ALL:
                raise ValueError(f"unknown shape {s!r}; known: {', '.join(SHAPES_ALL)}")
        for c in self.colors:
            if c not in COLORS:
                raise ValueError(f"unknown colour {c!r}; known: {', '.join(COLORS)}")
        for t in self.tasks:
            if t not in TASKS + EXTRA_TASKS:
                raise ValueError(f"unknown ShapeWorld task {t!r}; known: {', '.join(TASKS + EXTRA_TASKS)}")
        for op in self.edit_operations:
            if op not in EDIT_OPERATIONS:
                raise ValueError(f"unknown edit operation {op!r}; known: {', '.join(EDIT_OPERATIONS)}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if len(self.colors) < 2:
            raise ValueError("ShapeWorld needs at least two colours (recolour edits, two-colour subjects)")
        if not 0 <= self.subject_cell_distance <= 4:
            raise ValueError(f"subject_cell_distance must be in 0..4 (a 3 x 3 grid), got {self.subject_cell_distance}")
        if len(self.background_colors) < 2:
            raise ValueError("ShapeWorld needs at least two background colours (the customized views differ in it)")


PRESETS: dict[str, ShapeWorldConfig] = {
    "tiny": ShapeWorldConfig(),
    "hard": ShapeWorldConfig(
        size=64,
        shapes=("circle", "square", "triangle", "diamond", "cross", "star", "hexagon"),
        colors=("red", "orange", "yellow", "green", "blue", "purple", "brown", "black", "pink"),
        max_objects=6,
        num_subjects=200,
        subject_shapes=("circle", "square", "diamond", "triangle", "hexagon"),
        max_distractors=4,
    ),
}


# ----------------------------------------------------------------------------------------------- geometry

def _unit_shape(kind: str) -> np.ndarray:
    """Vertices of a shape inscribed in the unit circle, upright, y pointing down."""
    if kind == "circle":
        a = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        return np.stack([np.cos(a), np.sin(a)], 1)
    if kind == "square":
        s = 0.8
        return np.array([[-s, -s], [s, -s], [s, s], [-s, s]])
    if kind == "triangle":
        return np.array([[0.0, -1.0], [0.95, 0.8], [-0.95, 0.8]])
    if kind == "diamond":
        return np.array([[0.0, -1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    if kind == "cross":
        w, e = 0.36, 0.95
        return np.array([[-w, -e], [w, -e], [w, -w], [e, -w], [e, w], [w, w], [w, e], [-w, e],
                         [-w, w], [-e, w], [-e, -w], [-w, -w]])
    if kind == "star":
        a = np.linspace(0, 2 * np.pi, 10, endpoint=False) - np.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if kind == "hexagon":
        a = np.linspace(0, 2 * np.pi, 6, endpoint=False)
        return np.stack([np.cos(a), np.sin(a)], 1)
    raise ValueError(f"unknown shape {kind!r}")


_UNIT = {k: _unit_shape(k) for k in SHAPES_ALL}


def _pick(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
    """rng.choice without its conversion of `seq` to an array (which dominates for short tuples)."""
    return seq[int(rng.integers(len(seq)))]


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) pixel index grids, shared read-only."""
    y, x = np.mgrid[0:size, 0:size]
    return y, x


@functools.lru_cache(maxsize=8)
def _floor_depth(size: int) -> np.ndarray:
    ramp = np.linspace(20, 70, size, dtype=np.float32)  # the floor: far (dark) at the top, nearer below
    return np.repeat(ramp[:, None], size, 1).astype(np.uint8)


@dataclass
class Obj:
    """One shape in a scene; (cx, cy) is in OpenCV pixel-centre coordinates, r in pixels."""

    cls: str
    color: str
    size: str
    cx: float
    cy: float
    r: float
    depth: float  # 0 = far, 1 = near (the value written to depth.png / 255)
    subject: dict[str, Any] | None = None  # a patterned subject (customized task)

    def polygon(self) -> np.ndarray:
        return _UNIT[self.cls] * self.r + np.array([self.cx, self.cy])


def _fill(canvas: np.ndarray, poly: np.ndarray, value) -> None:
    pts = np.round(poly * 16).astype(np.int32)  # 4 fractional bits, so sub-pixel positions render exactly
    cv2.fillPoly(canvas, [pts], value, lineType=cv2.LINE_8, shift=4)


def _position_word(cx: float, cy: float, size: int) -> str:
    col = min(2, int(3 * (cx + 0.5) / size))
    row = min(2, int(3 * (cy + 0.5) / size))
    return [["at the top left", "at the top", "at the top right"],
            ["on the left", "in the center", "on the right"],
            ["at the bottom left", "at the bottom", "at the bottom right"]][row][col]




# ------------------------------------------------------------------------------------------------- render

@dataclass
class Background:
    texture: str
    color: str
    pixels: np.ndarray  # HxWx3 uint8

    def describe(self) -> str:
        return f"{self.texture} {self.color} background"


def _background(rng: np.random.Generator, cfg: ShapeWorldConfig, avoid_color: str | None = None) -> Background:
    texture = _pick(rng, cfg.textures)
    color = _pick(rng, [c for c in cfg.background_colors if c != avoid_color])
    s = cfg.size
    base = np.array(BACKGROUND_COLORS[color], np.float32) + rng.uniform(-8, 8, 3).astype(np.float32)
    y, x = _grid(s)
    if texture == "plain":
        delta = np.zeros((s, s), np.float32)
    elif texture == "striped":
        w = max(2, s // 16)
        delta = np.where(((x + y + int(rng.integers(0, 2 * w))) // w) % 2 == 0, 18.0, -18.0).astype(np.float32)
    elif texture == "checkered":
        c = max(2, s // 8)
        delta = np.where(((x // c) + (y // c)) % 2 == 0, 15.0, -15.0).astype(np.float32)
    elif texture == "dotted":
        p = max(4, s // 8)
        o = int(rng.integers(0, p))
        delta = np.where(((x + o) % p == p // 2) & ((y + o) % p == p // 2), 40.0, 0.0).astype(np.float32)
    elif texture == "mottled":
        noise = rng.normal(0, 1, (4, 4)).astype(np.float32)
        delta = cv2.resize(noise, (s, s), interpolation=cv2.INTER_CUBIC) * 14.0
    else:
        raise ValueError(f"unknown texture {texture!r}")
    pixels = np.clip(base[None, None, :] + delta[..., None], 0, 255).astype(np.uint8)
    return Background(texture, color, pixels)


def _pattern_select(subject: dict[str, Any], u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """True where a subject shows its second colour; u, v are coordinates in units of its radius."""
    p = subject["pattern"]
    if p == "split_v":
        return u >= 0
    if p == "split_h":
        return v >= 0
    if p == "ring":
        return u * u + v * v < 0.3
    if p == "quadrants":
        return (u >= 0) ^ (v >= 0)
    if p == "stripes":
        return np.floor((v + 1.0) * 2.5).astype(int) % 2 == 1
    if p == "diagonal":
        return u + v >= 0
    raise ValueError(f"unknown pattern {p!r}")


@dataclass
class Rendered:
    image: np.ndarray  # HxWx3 RGB
    instances: np.ndarray  # HxW, 0 = background, i = objects[i-1]
    depth: np.ndarray  # HxW, 255 = near
    seg: np.ndarray  # HxWx3, SEG_PALETTE colours
    full_area: list[int]  # unoccluded pixel count per object


def render(objects: Sequence[Obj], bg: Background, size: int) -> Rendered:
    image = bg.pixels.copy()
    instances = np.zeros((size, size), np.uint8)
    depth = _floor_depth(size).copy()
    seg = np.zeros((size, size, 3), np.uint8)
    full_area = []
    for i in sorted(range(len(objects)), key=lambda j: objects[j].depth):  # painter's order: far first
        o = objects[i]
        mask = np.zeros((size, size), np.uint8)
        _fill(mask, o.polygon(), 1)
        full_area.append((i, int(mask.sum())))
        sel = mask.astype(bool)
        if o.subject is None:
            image[sel] = COLORS[o.color]
        else:
            c1, c2 = (np.array(COLORS[c], np.uint8) for c in o.subject["colors"])
            y, x = _grid(size)
            second = _pattern_select(o.subject, (x - o.cx) / o.r, (y - o.cy) / o.r)
            image[sel & ~second] = c1
            image[sel & second] = c2
        instances[sel] = i + 1
        depth[sel] = int(round(o.depth * 255))
        seg[sel] = SEG_PALETTE["subject" if o.subject is not None else o.cls]
    areas = [a for _, a in sorted(full_area)]
    return Rendered(image, instances, depth, seg, areas)


def _visible_ok(r: Rendered, n: int, min_visible: float) -> bool:
    counts = np.bincount(r.instances.ravel(), minlength=n + 1)
    return all(counts[i + 1] >= max(4, min_visible * r.full_area[i]) for i in range(n))


def _box(instances: np.ndarray, index: int) -> list[int]:
    ys, xs = np.nonzero(instances == index + 1)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


# ---------------------------------------------------------------------------------------- scene sampling

def _radius(rng: np.random.Generator, cfg: ShapeWorldConfig, size_word: str) -> float:
    lo, hi = cfg.sizes[size_word]
    return float(rng.uniform(lo, hi)) * cfg.size / 2


def _place(rng: np.random.Generator, cfg: ShapeWorldConfig, r: float, cell: tuple[int, int] | None = None):
    s = cfg.size
    lo, hi = r, s - 1 - r
    if cell is None:
        return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
    row, col = cell  # a centre inside the given third of the image, clamped so the shape stays inside
    def axis(k: int) -> float:
        a, b = max(lo, k * s / 3 - 0.5), min(hi, (k + 1) * s / 3 - 0.5 - 1e-3)
        return float(rng.uniform(a, b)) if a < b else float(np.clip((k + 0.5) * s / 3 - 0.5, lo, hi))
    return axis(col), axis(row)


def _random_obj(rng: np.random.Generator, cfg: ShapeWorldConfig, **fixed: Any) -> Obj:
    cls = fixed["cls"] if "cls" in fixed else _pick(rng, cfg.shapes)
    color = fixed["color"] if "color" in fixed else _pick(rng, cfg.colors)
    size = fixed["size"] if "size" in fixed else _pick(rng, list(cfg.sizes))
    r = _radius(rng, cfg, size)
    cx, cy = _place(rng, cfg, r)
    return Obj(cls, color, size, cx, cy, r, float(rng.uniform(0.35, 1.0)))


def _scene(rng: np.random.Generator, cfg: ShapeWorldConfig, n: int, bg: Background,
           duplicate_class: bool = False) -> tuple[list[Obj], Rendered]:
    """n objects whose every member keeps `min_visible` of its pixels; fewer objects if that keeps failing."""
    for attempt in range(200):
        k = max(1, n - attempt // 50)
        objs = [_random_obj(rng, cfg) for _ in range(k)]
        if duplicate_class and k >= 2:
            objs[1] = _random_obj(rng, cfg, cls=objs[0].cls)
        r = render(objs, bg, cfg.size)
        if _visible_ok(r, k, cfg.min_visible):
            return objs, r
    raise RuntimeError("ShapeWorld could not place a single visible object; check sizes and min_visible")


# ------------------------------------------------------------------------------------------ descriptions

def _name(o: Obj) -> str:
    return f"{o.size} {o.color} {o.cls}"


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(objs: Sequence[Obj], bg: Background, size: int) -> str:
    order = sorted(objs, key=lambda o: (o.cx, o.cy))
    parts = [f"{_article(_name(o))} {_position_word(o.cx, o.cy, size)}" for o in order]
    if not parts:
        return _article(bg.describe())
    return f"{_join(parts)}, on {_article(bg.describe())}"


def expressions(objs: Sequence[Obj], i: int) -> list[str]:
    """Every attribute phrase that singles out objects[i], shortest first; empty if none does."""
    o, out = objs[i], []
    for attrs in (("cls",), ("color", "cls"), ("size", "cls"), ("size", "color", "cls")):
        if [j for j, p in enumerate(objs) if all(getattr(p, a) == getattr(o, a) for a in attrs)] == [i]:
            out.append("the " + " ".join(getattr(o, a) for a in attrs))
    return out


def _plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")


def _obj_record(o: Obj, inst: np.ndarray, index: int) -> dict[str, Any]:
    poly = (o.polygon() + 0.5).round(2)  # record frame: pixel i covers [i, i+1)
    rec: dict[str, Any] = {
        "class": o.cls, "color": o.color, "rgb": list(COLORS[o.color]), "size": o.size,
        "box": _box(inst, index), "depth": round(o.depth, 3), "polygon": [poly.ravel().tolist()],
    }
    if o.subject is not None:
        rec.update(subject_id=o.subject["id"], colors=list(o.subject["colors"]), pattern=o.subject["pattern"],
                   rgb=list(COLORS[o.subject["colors"][0]]), rgbs=[list(COLORS[c]) for c in o.subject["colors"]],
                   color="-and-".join(o.subject["colors"]), shape=o.subject["shape"])
    return rec


# ---------------------------------------------------------------------------------------- encoding

def _mask_png(m: np.ndarray) -> bytes:
    return encode_png((m > 0).astype(np.uint8) * 255)


def _json(rec: dict[str, Any]) -> bytes:
    return json.dumps(rec, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _background_record(bg: Background) -> dict[str, Any]:
    return {"texture": bg.texture, "color": bg.color, "rgb": list(BACKGROUND_COLORS[bg.color])}


def _base_record(task: str, prompt: str, cap: str, cfg: ShapeWorldConfig, bg: Background, split: str,
                 index: int) -> dict[str, Any]:
    return {"task": task, "prompt": prompt, "caption": cap, "width": cfg.size, "height": cfg.size,
            "dataset": "shapeworld", "background": _background_record(bg),
            "shapeworld": {"split": split, "index": index}}


# -------------------------------------------------------------------------------------------- tasks

def _n_objects(rng: np.random.Generator, cfg: ShapeWorldConfig, lo: int | None = None) -> int:
    lo = max(cfg.min_objects, lo or 1)
    return int(rng.integers(min(lo, cfg.max_objects), cfg.max_objects + 1))


def make_scene_sample(rng, cfg, task, split, index) -> dict[str, bytes]:
    """inpainting and control: a scene with its objects (control adds depth and segmentation maps)."""
    bg = _background(rng, cfg)
    objs, r = _scene(rng, cfg, _n_objects(rng, cfg), bg)
    cap = caption(objs, bg, cfg.size)
    rec = _base_record(task, cap, cap, cfg, bg, split, index)
    rec["objects"] = [_obj_record(o, r.instances, i) for i, o in enumerate(objs)]
    out = {"image.png": encode_png(r.image), "instances.png": encode_png(r.instances)}
    if task == "control":
        rec["control"] = {"types": ["depth", "seg", "canny"],
                          "seg_palette": {k: list(v) for k, v in SEG_PALETTE.items()}}
        out.update({"depth.png": encode_png(r.depth), "seg.png": encode_png(r.seg)})
    return {"json": _json(rec), **out}


def make_grounding(rng, cfg, split, index) -> dict[str, bytes]:
    bg = _background(rng, cfg)
    for _ in range(100):
        objs, r = _scene(rng, cfg, _n_objects(rng, cfg, lo=2), bg, duplicate_class=bool(rng.random() < 0.5))
        candidates = [i for i in range(len(objs)) if expressions(objs, i)]
        if candidates:
            break
    else:
        raise RuntimeError("no scene with a uniquely describable object")
    t = _pick(rng, candidates)
    exprs = expressions(objs, t)
    cap = caption(objs, bg, cfg.size)
    same = [i for i, o in enumerate(objs) if o.cls == objs[t].cls]
    rec = _base_record("grounding", exprs[-1], cap, cfg, bg, split, index)
    rec["objects"] = [_obj_record(o, r.instances, i) for i, o in enumerate(objs)]
    rec["grounding"] = {
        "expression": exprs[-1], "expressions": exprs, "class": objs[t].cls, "class_plural": _plural(objs[t].cls),
        "object_index": t, "box": rec["objects"][t]["box"], "polygon": rec["objects"][t]["polygon"],
        "instances": [rec["objects"][i]["box"] for i in same], "instance_indices": same,
    }
    return {"json": _json(rec), "image.png": encode_png(r.image), "instances.png": encode_png(r.instances)}


def subject_pool(cfg: ShapeWorldConfig) -> list[dict[str, Any]]:
    """The fixed pool of patterned subjects; it depends only on the config, not on the data seed."""
    rng = np.random.default_rng(cfg.subject_seed)
    combos = [(s, p, a, b) for s in cfg.subject_shapes for p in cfg.subject_patterns
              for a in cfg.colors for b in cfg.colors if a != b]
    pick = rng.permutation(len(combos))[: cfg.num_subjects]
    return [{"id": f"subject-{k:04d}", "shape": combos[j][0], "pattern": combos[j][1],
             "colors": [combos[j][2], combos[j][3]]} for k, j in enumerate(pick)]


def _cell_centre(cell: tuple[int, int], r: float, size: int) -> tuple[float, float]:
    """Centre of a shape of radius r in the middle of a 3 x 3 cell (row, col), moved inside the image if needed."""
    lo, hi = r, size - 1 - r
    return tuple(float(np.clip((k + 0.5) * size / 3 - 0.5, lo, hi)) for k in (cell[1], cell[0]))  # (cx, cy)


def _subject_cells(rng: np.random.Generator, cfg: ShapeWorldConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """The subject's cells in the two views, at least `subject_cell_distance` apart (Manhattan), so that a copy of
    one view puts the subject where the other view's prompt does not."""
    cells = [(r, c) for r in range(3) for c in range(3)]
    a = cells[int(rng.integers(len(cells)))]
    far = [b for b in cells if abs(b[0] - a[0]) + abs(b[1] - a[1]) >= cfg.subject_cell_distance]
    return a, far[int(rng.integers(len(far)))]


def _subject_scene(rng, cfg, subject, bg, cell) -> tuple[list[Obj], Rendered, str]:
    s = cfg.size
    for _ in range(200):
        size_word = _pick(rng, list(cfg.subject_sizes))
        r = cfg.subject_sizes[size_word] * s / 2
        cx, cy = _cell_centre(cell, r, s)
        main = Obj(subject["shape"], subject["colors"][0], size_word, cx, cy, r, 1.0, subject=subject)
        extra = [replace(_random_obj(rng, cfg, size="small"), depth=float(rng.uniform(0.35, 0.9)))
                 for _ in range(int(rng.integers(0, cfg.max_distractors + 1)))]
        objs = [main, *extra]
        rend = render(objs, bg, s)
        if _visible_ok(rend, len(objs), cfg.min_visible):
            desc = f"the subject, {main.size}, {_position_word(cx, cy, s)}"
            if extra:
                desc += ", with " + _join([f"{_article(f'{o.color} {o.cls}')} {_position_word(o.cx, o.cy, s)}"
                                           for o in sorted(extra, key=lambda o: o.cx)])
            return objs, rend, f"{desc}, on {_article(bg.describe())}"
    raise RuntimeError("could not place a subject")


def make_customized(rng, cfg, split, index, pool) -> dict[str, bytes]:
    subject = pool[index % len(pool)]  # every subject equally often
    bg_a = _background(rng, cfg)
    bg_b = _background(rng, cfg, avoid_color=bg_a.color)  # a copy of one view has the other's background wrong
    cell_a, cell_b = _subject_cells(rng, cfg)
    objs_a, ra, desc_a = _subject_scene(rng, cfg, subject, bg_a, cell_a)
    objs_b, rb, desc_b = _subject_scene(rng, cfg, subject, bg_b, cell_b)
    rec = _base_record("customized", desc_b, desc_b, cfg, bg_b, split, index)
    rec["objects"] = [_obj_record(o, rb.instances, i) for i, o in enumerate(objs_b)]
    rec["subject"] = {"id": subject["id"], "shape": subject["shape"], "pattern": subject["pattern"],
                      "colors": list(subject["colors"]), "source_description": desc_a,
                      "target_description": desc_b,
                      "source_objects": [_obj_record(o, ra.instances, i) for i, o in enumerate(objs_a)],
                      "source_background": _background_record(bg_a)}
    return {"json": _json(rec), "image.png": encode_png(rb.image), "source.png": encode_png(ra.image),
            "mask.png": _mask_png(rb.instances == 1), "source_mask.png": _mask_png(ra.instances == 1),
            "instances.png": encode_png(rb.instances)}


def make_two_subjects(rng, cfg, split, index, pool) -> dict[str, bytes]:
    """Two subjects of the pool in one scene, the first in the left column and the second in the right one
    (rows drawn), small; each subject's reference is a view of it alone (with distractors) on another background,
    as in the customized pairs. Conditions: `source.png` (the first reference), `source.1.png` (the second)."""
    first = pool[index % len(pool)]
    second = pool[(index * 7 + 1) % len(pool)]
    if second["id"] == first["id"]:
        second = pool[(index * 7 + 2) % len(pool)]
    s = cfg.size
    bg = _background(rng, cfg)
    for _ in range(200):
        size_word = "small"
        r = cfg.subject_sizes[size_word] * s / 2
        objs = []
        for subject, col in ((first, 0), (second, 2)):
            cx, cy = _cell_centre((int(rng.integers(3)), col), r, s)
            objs.append(Obj(subject["shape"], subject["colors"][0], size_word, cx, cy, r, 1.0, subject=subject))
        rend = render(objs, bg, s)
        if _visible_ok(rend, len(objs), cfg.min_visible):
            break
    else:
        raise RuntimeError("could not place two subjects")
    references = []
    for subject in (first, second):
        bg_ref = _background(rng, cfg, avoid_color=bg.color)
        cell = (int(rng.integers(3)), int(rng.integers(3)))
        references.append(_subject_scene(rng, cfg, subject, bg_ref, cell))
    prompt = (f"the first subject {_position_word(objs[0].cx, objs[0].cy, s)} and the second "
              f"{_position_word(objs[1].cx, objs[1].cy, s)}, on {_article(bg.describe())}")
    rec = _base_record("two_subjects", prompt, prompt, cfg, bg, split, index)
    rec["objects"] = [_obj_record(o, rend.instances, i) for i, o in enumerate(objs)]
    rec["subjects"] = [{"id": sub["id"], "shape": sub["shape"], "pattern": sub["pattern"],
                        "colors": list(sub["colors"]), "reference_description": desc}
                       for sub, (_, _, desc) in zip((first, second), references)]
    rec["conditions"] = [{"role": "subject"}, {"role": "subject"}]
    return {"json": _json(rec), "image.png": encode_png(rend.image), "source.png": encode_png(references[0][1].image),
            "source.1.png": encode_png(references[1][1].image), "instances.png": encode_png(rend.instances)}


_SIZE_ORDER = ("small", "medium", "large")


def _edit(rng, cfg, op, objs: list[Obj]) -> tuple[list[Obj], str, int | None, int | None]:
    """Apply `op` to a scene: (target objects, instruction, source index, target index) or raises ValueError."""
    refs = [i for i in range(len(objs)) if expressions(objs, i)]
    if op != "add" and not refs:
        raise ValueError("nothing to refer to")
    i = _pick(rng, refs) if op != "add" else None
    expr = _pick(rng, expressions(objs, i)) if i is not None else ""
    new = [replace(o) for o in objs]
    if op == "recolor":
        color = _pick(rng, [c for c in cfg.colors if c != objs[i].color])
        new[i].color = color
        verb = _pick(rng, ["make {e} {c}", "turn {e} {c}", "change the color of {e} to {c}", "paint {e} {c}"])
        return new, verb.format(e=expr, c=color), i, i
    if op == "remove":
        del new[i]
        verb = _pick(rng, ["remove {e}", "delete {e}", "take away {e}", "erase {e}"])
        return new, verb.format(e=expr), i, None
    if op == "add":
        cell = (int(rng.integers(0, 3)), int(rng.integers(0, 3)))
        o = _random_obj(rng, cfg)
        o.cx, o.cy = _place(rng, cfg, o.r, cell)
        o.depth = 1.0  # in front, so the added object is whole
        new.append(o)
        verb = _pick(rng, ["add {n} {p}", "put {n} {p}", "place {n} {p}"])
        return new, verb.format(n=_article(_name(o)), p=_position_word(o.cx, o.cy, cfg.size)), None, len(new) - 1
    if op == "move":
        here = (min(2, int(3 * (objs[i].cy + 0.5) / cfg.size)), min(2, int(3 * (objs[i].cx + 0.5) / cfg.size)))
        cells = [(r, c) for r in range(3) for c in range(3) if (r, c) != here]
        cell = cells[int(rng.integers(0, len(cells)))]
        new[i].cx, new[i].cy = _place(rng, cfg, new[i].r, cell)
        verb = _pick(rng, ["move {e} {p}", "shift {e} {p}", "put {e} {p}"])
        where = _position_word(new[i].cx, new[i].cy, cfg.size)
        if not verb.startswith("put"):  # "at the top" -> "to the top"
            where = "to the " + where.split(" the ", 1)[1]
        return new, verb.format(e=expr, p=where), i, i
    if op == "resize":
        k = _SIZE_ORDER.index(objs[i].size)
        up = k == 0 or (k < len(_SIZE_ORDER) - 1 and rng.random() < 0.5)
        new[i].size = _SIZE_ORDER[k + 1 if up else k - 1]
        new[i].r = _radius(rng, cfg, new[i].size)
        lo, hi = new[i].r, cfg.size - 1 - new[i].r
        new[i].cx, new[i].cy = float(np.clip(new[i].cx, lo, hi)), float(np.clip(new[i].cy, lo, hi))
        word = "bigger" if up else "smaller"
        verb = _pick(rng, ["make {e} {w}", "make {e} a bit {w}", "resize {e} to be {w}"])
        return new, verb.format(e=expr, w=word), i, i
    raise ValueError(f"unknown edit operation {op!r}")


def make_editing(rng, cfg, split, index) -> dict[str, bytes]:
    op = cfg.edit_operations[index % len(cfg.edit_operations)]  # operations in equal shares
    bg = _background(rng, cfg)
    lo = 2 if op == "remove" else 1
    for _ in range(200):
        n = _n_objects(rng, cfg, lo=lo)
        if op == "add":
            n = min(n, max(cfg.max_objects - 1, 1))
        objs, rs = _scene(rng, cfg, n, bg)
        try:
            new, instruction, si, ti = _edit(rng, cfg, op, objs)
        except ValueError:
            continue
        rt = render(new, bg, cfg.size)
        if not _visible_ok(rt, len(new), cfg.min_visible):
            continue
        region = np.zeros((cfg.size, cfg.size), bool)
        if si is not None:
            region |= rs.instances == si + 1
        if ti is not None:
            region |= rt.instances == ti + 1
        break
    else:
        raise RuntimeError(f"could not make a {op} edit")
    cap_t, cap_s = caption(new, bg, cfg.size), caption(objs, bg, cfg.size)
    rec = _base_record("editing", instruction, cap_t, cfg, bg, split, index)
    rec["objects"] = [_obj_record(o, rt.instances, i) for i, o in enumerate(new)]
    rec["edit"] = {"operation": op, "instruction": instruction, "source_caption": cap_s,
                   "source_object_index": si, "object_index": ti,
                   "source_objects": [_obj_record(o, rs.instances, i) for i, o in enumerate(objs)]}
    return {"json": _json(rec), "image.png": encode_png(rt.image), "source.png": encode_png(rs.image),
            "mask.png": _mask_png(region), "instances.png": encode_png(rt.instances)}


_TASK_IDS = {t: k for k, t in enumerate(TASKS + EXTRA_TASKS)}
_SPLIT_IDS = {s: k for k, s in enumerate(SPLITS)}


def make_sample(cfg: ShapeWorldConfig, task: str, split: str, index: int, seed: int,
                pool: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One sample as tar members (`__key__` plus `{field}.{ext}` -> bytes); a pure function of its arguments."""
    rng = np.random.default_rng([seed, _TASK_IDS[task], _SPLIT_IDS[split], index])
    if task in ("inpainting", "control"):
        members = make_scene_sample(rng, cfg, task, split, index)
    elif task == "grounding":
        members = make_grounding(rng, cfg, split, index)
    elif task == "customized":
        members = make_customized(rng, cfg, split, index, pool if pool is not None else subject_pool(cfg))
    elif task == "editing":
        members = make_editing(rng, cfg, split, index)
    elif task == "two_subjects":
        members = make_two_subjects(rng, cfg, split, index, pool if pool is not None else subject_pool(cfg))
    else:
        raise ValueError(f"unknown ShapeWorld task {task!r}")
    return {"__key__": f"sw-{task}-{split}-{index:07d}", **members}


# --------------------------------------------------------------------------------------------- writing

def _shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:04d}.tar"


def _write_shard(job: tuple[ShapeWorldConfig, str, str, int, int, int, int]) -> int:
    cfg, out_dir, task, split, shard, count, seed = job
    path = Path(out_dir) / task / _shard_name(split, shard)
    pool = subject_pool(cfg) if task in ("customized", "two_subjects") else None
    start = shard * cfg.shard_size
    # fixed mtime, owner and mode: byte-identical tars for the same seed (members sorted by name, as
    # webdataset's TarWriter wrote them before). An integer mtime also keeps tarfile from adding a PAX header
    # to every member (it does for float mtimes), which halves read time. The manifest goes beside the tar.
    with ShardWriter(path, user="shapeworld", group="shapeworld") as sink:
        for index in range(start, start + count):
            sample = make_sample(cfg, task, split, index, seed, pool)
            key = sample.pop("__key__")
            sink.write(key, sorted(sample.items()))
    return count


def _shard_counts(n: int, shard_size: int) -> list[int]:
    return [min(shard_size, n - s) for s in range(0, n, shard_size)]


def _pattern(task_dir: str, split: str, n_shards: int) -> str:
    if n_shards == 1:
        return f"{task_dir}/{_shard_name(split, 0)}"
    return f"{task_dir}/{split}-{{0000..{n_shards - 1:04d}}}.tar"


def generate(out_dir: str | os.PathLike, train: int = 2000, val: int = 256, seed: int = 0,
             config: ShapeWorldConfig | None = None, workers: int | None = None, progress: bool = True) -> dict:
    """Write `train` and `val` samples per task under `out_dir/{task}/{split}-NNNN.tar`; returns the manifest.

    The manifest (`out_dir/shapeworld.json`) is written last, so its presence means the dataset is complete.
    """
    cfg = config or ShapeWorldConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    jobs = []
    for task in cfg.tasks:
        (out / task).mkdir(exist_ok=True)
        for split, n in (("train", train), ("val", val)):
            for shard, count in enumerate(_shard_counts(n, cfg.shard_size)):
                jobs.append((cfg, str(out), task, split, shard, count, seed))
    workers = workers if workers is not None else min(len(jobs), os.cpu_count() or 1, 8)
    started = time.time()
    run_jobs(_write_shard, jobs, workers, desc="shapeworld", unit="sample", weight=lambda job: job[5],
             progress=progress)
    shards = {}
    for task in cfg.tasks:
        shards[task] = {split: _pattern(task, split, len(_shard_counts(n, cfg.shard_size)))
                        for split, n in (("train", train), ("val", val)) if n > 0}
    manifest = {"format": FORMAT_VERSION, "seed": seed, "train": train, "val": val, "config": asdict(cfg),
                "shards": shards, "seconds": round(time.time() - started, 2)}
    text = json.dumps(manifest, indent=1, sort_keys=True)
    (out / MANIFEST).write_text(text)
    return json.loads(text)  # as ensure_shapeworld reads it back (tuples become lists)


def _same_request(manifest: dict, train: int, val: int, seed: int, cfg: ShapeWorldConfig) -> bool:
    want = json.loads(json.dumps(asdict(cfg)))  # tuples -> lists, as stored
    return (manifest.get("format") == FORMAT_VERSION and manifest.get("train") == train
            and manifest.get("val") == val and manifest.get("seed") == seed and manifest.get("config") == want)


def _add_missing_shard_manifests(out: Path, manifest: dict) -> None:
    """Datasets generated before shard manifests existed get them in place (the shards stay as they are)."""
    for task in manifest.get("shards", {}):
        for shard in sorted((out / task).glob("*.tar")):
            if not Path(manifest_path(shard)).exists():
                write_manifest(shard, describe(shard, keys_in_tar(shard)))


def ensure_shapeworld(out_dir: str | os.PathLike, train: int = 2000, val: int = 256, seed: int = 0,
                      config: ShapeWorldConfig | None = None, workers: int | None = None,
                      progress: bool = True) -> dict:
    """Generate ShapeWorld into `out_dir` unless a complete dataset with the same request is already there."""
    cfg = config or ShapeWorldConfig()
    path = Path(out_dir) / MANIFEST
    if path.exists():
        manifest = json.loads(path.read_text())
        if _same_request(manifest, train, val, seed, cfg):
            _add_missing_shard_manifests(Path(out_dir), manifest)
            return manifest
        for task in manifest.get("shards", {}):  # a different request: replace only what ShapeWorld wrote
            shutil.rmtree(Path(out_dir) / task, ignore_errors=True)
    return generate(out_dir, train=train, val=val, seed=seed, config=cfg, workers=workers, progress=progress)


def shard_patterns(out_dir: str | os.PathLike, split: str = "train") -> dict[str, str]:
    """Brace patterns per mixture task for one split; `t2i` and `reconstruct` read the inpainting scenes."""
    manifest = json.loads((Path(out_dir) / MANIFEST).read_text())
    out = {task: str(Path(out_dir) / pats[split]) for task, pats in manifest["shards"].items() if split in pats}
    if "inpainting" in out:
        out["t2i"] = out["reconstruct"] = out["inpainting"]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_recipes.shapeworld", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--train", type=int, default=2000, help="train samples per task")
    ap.add_argument("--val", type=int, default=256, help="validation samples per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--size", type=int, help="image side in pixels (overrides the preset)")
    ap.add_argument("--max-objects", type=int, help="objects per scene, at most (overrides the preset)")
    ap.add_argument("--tasks", nargs="+", choices=TASKS + EXTRA_TASKS, help="only these tasks (two_subjects: opt-in)")
    ap.add_argument("--workers", type=int, help="processes (default: one per core)")
    ap.add_argument("--if-missing", action="store_true",
                    help="keep a complete dataset already there with the same settings (used by make targets)")
    args = ap.parse_args(argv)
    cfg = PRESETS[args.preset]
    overrides = {k: v for k, v in (("size", args.size), ("max_objects", args.max_objects),
                                   ("tasks", tuple(args.tasks) if args.tasks else None)) if v is not None}
    cfg = replace(cfg, **overrides)
    make = ensure_shapeworld if args.if_missing else generate
    manifest = make(args.out, train=args.train, val=args.val, seed=args.seed, config=cfg, workers=args.workers)
    if args.if_missing:
        print(f"ShapeWorld ready in {args.out} ({len(manifest['shards'])} tasks)")
        return 0
    print(f"wrote {len(cfg.tasks)} tasks x ({args.train} train + {args.val} val) to {args.out} "
          f"in {manifest['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
