"""Decode and validate one stored sample (the tar members sharing a key) into a `Sample`.

Anything wrong with a sample raises `BadSample` with a category and a one-line reason; the loader counts
and skips it, the validator (`python -m data_recipes.check`) lists it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from cologen.data.tasks import TASKS

# Why a sample was skipped; the skip counter keeps one count per category. `truncated`: a shard that held fewer
# samples than its manifest says (counted once per read of it); `duplicate`: a key met again in a shard, or a
# sample with a member twice (not delivered); `crop`: the output frame loses what the example is about
# (builders' refusals, docs/data.md).
SKIP_CATEGORIES: tuple[str, ...] = ("tar", "missing", "decode", "encoding", "record", "build", "truncated",
                                    "duplicate", "crop")
IMAGE_EXTS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp")
# Optional members and how to decode them: colour images, or single-channel maps.
COLOR_FIELDS: tuple[str, ...] = ("image", "source", "seg")
GRAY_FIELDS: tuple[str, ...] = ("mask", "source_mask", "depth", "instances")
ALL_FIELDS: frozenset[str] = frozenset(COLOR_FIELDS + GRAY_FIELDS)
# Conditions after the first (`source`): members `source.1.png`, `source.2.png`, ... in order, decoded with
# `source`; the record's optional `conditions` list names each condition's role (docs/multi_condition.md).
MAX_CONDITIONS = 8
CONDITION_ROLES: tuple[str, ...] = ("image", "subject", "depth", "seg", "canny", "mask", "layout")


def one_line(text: str, limit: int = 300) -> str:
    """A reason as one line (library messages span lines), cut at `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class BadSample(Exception):
    """A sample that cannot be used; `category` is one of SKIP_CATEGORIES, `reason` one line. `key` names the
    sample, or the place in a shard for archive-level problems ("after KEY")."""

    def __init__(self, category: str, reason: str, key: str = "?"):
        reason = one_line(reason)
        super().__init__(f"{key}: {reason}")
        self.category, self.reason, self.key = category, reason, key


@dataclass
class Sample:
    """A decoded sample in its stored frame; images are RGB uint8, maps are single-channel uint8."""

    key: str
    url: str
    record: dict[str, Any]
    image: np.ndarray
    source: np.ndarray | None = None
    mask: np.ndarray | None = None
    source_mask: np.ndarray | None = None
    depth: np.ndarray | None = None
    seg: np.ndarray | None = None
    instances: np.ndarray | None = None
    extra_sources: list[np.ndarray] = field(default_factory=list)  # conditions 2, 3, ... (`source.1.png`, ...)

    @property
    def task(self) -> str:
        return self.record["task"]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the stored target image."""
        return int(self.image.shape[1]), int(self.image.shape[0])


def _member(raw: dict[str, Any], name: str) -> tuple[str, bytes] | None:
    for ext in IMAGE_EXTS:
        data = raw.get(f"{name}.{ext}")
        if data is not None:
            return f"{name}.{ext}", data
    return None


def _decode_image(data: bytes, member: str, key: str, color: bool) -> np.ndarray:
    if not data:  # OpenCV raises a two-line error for an empty buffer instead of returning None
        raise BadSample("decode", f"{member} is empty (0 bytes)", key)
    try:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        arr = None
    if arr is None or arr.size == 0:
        raise BadSample("decode", f"cannot decode {member}", key)
    if arr.dtype != np.uint8:  # 16-bit PNG depth maps and the like
        arr = (arr.astype(np.float32) * (255.0 / np.iinfo(arr.dtype).max)).astype(np.uint8)
    if color:
        if arr.ndim == 2:
            return cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB)
        code = cv2.COLOR_BGRA2RGB if arr.shape[2] == 4 else cv2.COLOR_BGR2RGB
        return cv2.cvtColor(arr, code)
    if arr.ndim == 3:  # a map saved with three equal channels
        arr = arr[..., 0]
    return arr


def parse_record(data: bytes | None, key: str) -> dict[str, Any]:
    """The JSON record, checked for the fields every task needs."""
    if data is None:
        raise BadSample("missing", "no .json record", key)
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSample("encoding", f"record is not valid UTF-8 ({e.reason} at byte {e.start})", key) from None
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadSample("record", f"record is not valid JSON ({e.msg})", key) from None
    if not isinstance(rec, dict):
        raise BadSample("record", "record is not a JSON object", key)
    if rec.get("task") not in TASKS:
        raise BadSample("record", f"unknown task {rec.get('task')!r}", key)
    if not isinstance(rec.get("prompt"), str):
        raise BadSample("record", "prompt is missing or not a string", key)
    for dim in ("width", "height"):
        v = rec.get(dim)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise BadSample("record", f"{dim} is missing or not a positive integer", key)
    return rec


def _check_box(box: Any, w: int, h: int, where: str, key: str) -> None:
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        raise BadSample("record", f"{where} is not [x0, y0, x1, y1]", key)
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise BadSample("record", f"{where} {list(box)} is outside the {w}x{h} image or empty", key)


def check_geometry(rec: dict[str, Any], key: str) -> None:
    """Every box of the record lies inside the stored image (the convention of docs/data.md)."""
    w, h = rec["width"], rec["height"]
    objects = rec.get("objects", [])
    if not isinstance(objects, list):
        raise BadSample("record", "objects is not a list", key)
    for i, obj in enumerate(objects):
        if not isinstance(obj, dict):
            raise BadSample("record", f"objects[{i}] is not an object", key)
        if "box" in obj:
            _check_box(obj["box"], w, h, f"objects[{i}].box", key)
    g = rec.get("grounding")
    if g is not None:
        if not isinstance(g, dict) or "box" not in g:
            raise BadSample("record", "grounding block without a box", key)
        _check_box(g["box"], w, h, "grounding.box", key)
        for j, b in enumerate(g.get("instances", [])):
            _check_box(b, w, h, f"grounding.instances[{j}]", key)


def decode_sample(raw: dict[str, Any], fields: Iterable[str] | None = None) -> Sample:
    """Decode the members in `fields` (all if None; the target image always) and validate the record."""
    key = str(raw.get("__key__", "?"))
    rec = parse_record(raw.get("json"), key)
    check_geometry(rec, key)
    wanted = ALL_FIELDS if fields is None else set(fields) | {"image"}
    found = _member(raw, "image")
    if found is None:
        raise BadSample("missing", "no target image (image.png/.jpg/.webp)", key)
    out: dict[str, Any] = {}
    for name in sorted(wanted):
        item = found if name == "image" else _member(raw, name)
        if item is None:
            continue
        member, data = item
        arr = _decode_image(data, member, key, color=name in COLOR_FIELDS)
        out[name] = arr
    extra = []
    if "source" in wanted:
        for i in range(1, MAX_CONDITIONS):
            item = _member(raw, f"source.{i}")
            if item is None:
                break
            extra.append(_decode_image(item[1], item[0], key, color=True))
    if extra and "source" not in out:
        raise BadSample("missing", "source.1 without source (the first condition)", key)
    conditions = rec.get("conditions")
    if conditions is not None:
        if not isinstance(conditions, list) or len(conditions) != 1 + len(extra):
            raise BadSample("record", f"conditions lists {len(conditions) if isinstance(conditions, list) else '?'} "
                            f"conditions but the sample has {1 + len(extra)} (source, source.1, ...)", key)
        for i, c in enumerate(conditions):
            if not isinstance(c, dict) or c.get("role") not in CONDITION_ROLES:
                raise BadSample("record", f"conditions[{i}].role must be one of {', '.join(CONDITION_ROLES)}", key)
    image = out.pop("image")
    h, w = image.shape[:2]
    if (w, h) != (rec["width"], rec["height"]):
        raise BadSample("record", f"image is {w}x{h} but the record says {rec['width']}x{rec['height']}", key)
    for name in ("mask", "depth", "seg", "instances"):
        if name in out and out[name].shape[:2] != (h, w):
            raise BadSample("record", f"{name} is {out[name].shape[1]}x{out[name].shape[0]}, image is {w}x{h}", key)
    if "source" in out and "source_mask" in out and out["source_mask"].shape[:2] != out["source"].shape[:2]:
        raise BadSample("record", "source_mask and source differ in size", key)
    return Sample(key=key, url=str(raw.get("__url__", "")), record=rec, image=image, extra_sources=extra, **out)
