"""The grounding record, shared by `refcoco` and `lvis` (same fields as ShapeWorld's grounding samples)."""

from __future__ import annotations

from typing import Any


def plural(word: str) -> str:
    """English plural of a class noun's last word ("baseball bat" -> "baseball bats"), good enough for prompts."""
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def grounding_block(expressions: list[str], cls: str, objects: list[dict[str, Any]], target: int,
                    unique: bool = True, **ids: Any) -> dict[str, Any]:
    """`objects` are the instances of `cls` in the image (`box`, `polygon`); `target` is the referred one.

    `unique` says whether the expression singles out `objects[target]` (a referring expression) or merely
    names the class (LVIS), in which case only the all-instances overlay answers it unambiguously.
    """
    same = [i for i, o in enumerate(objects) if o["class"] == cls]
    return {"expression": expressions[0], "expressions": expressions, "class": cls, "class_plural": plural(cls) if cls else None,
            "object_index": target, "box": objects[target]["box"], "polygon": objects[target]["polygon"],
            "instances": [objects[i]["box"] for i in same], "instance_indices": same, "unique": unique, **ids}
