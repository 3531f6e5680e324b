"""A sample's annotated objects in the output frame: index, record, box and pixel mask."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cologen.data.geometry import Frame, box_of, fill_polygons, map_box, map_polygon


@dataclass
class FramedObject:
    index: int  # position in record["objects"]
    record: dict[str, Any]
    box: list[int]  # output frame, x1/y1 exclusive
    mask: np.ndarray  # output frame, 0/1 uint8


def object_mask(record: dict[str, Any], index: int, frame: Frame, instances: np.ndarray | None) -> np.ndarray | None:
    """The visible pixels of object `index`: from the instance map, else its polygon, else its box."""
    if instances is not None:
        return (instances == index + 1).astype(np.uint8)
    obj = record.get("objects", [])[index]
    if obj.get("polygon"):
        return fill_polygons([map_polygon(p, frame) for p in obj["polygon"]], frame.width, frame.height)
    if "box" in obj:
        b = map_box(obj["box"], frame)
        if b is None:
            return None
        m = np.zeros((frame.height, frame.width), np.uint8)
        m[b[1]:b[3], b[0]:b[2]] = 1
        return m
    return None


def framed_objects(record: dict[str, Any], frame: Frame, instances: np.ndarray | None) -> list[FramedObject]:
    """Objects still visible after the resize and crop; `instances` must already be in the output frame."""
    out = []
    for i, obj in enumerate(record.get("objects", [])):
        mask = object_mask(record, i, frame, instances)
        if mask is None or not mask.any():
            continue
        out.append(FramedObject(i, obj, box_of(mask), mask))
    return out
