"""ShapeWorld metrics: the ground truth scores perfect, wrong outputs clearly worse.

Scenes are drawn here with OpenCV, independent of the data pipeline."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from cologen.metrics.edges import canny_edges
from cologen.metrics.pixel import PSNR_CAP_DB
from cologen.metrics.shapes import SHAPE_PROTOTYPES, classify_shape
from cologen.metrics.shapeworld import (
    aggregate,
    box_iou,
    control_scores,
    customized_scores,
    editing_scores,
    grounding_scores,
    inpainting_scores,
    prompt_fidelity,
)

BG = (235, 235, 235)
RED = (220, 40, 40)
BLUE = (40, 40, 220)
GREEN = (40, 180, 60)
YELLOW = (240, 220, 30)


def canvas(h: int = 64, w: int = 64, bg: tuple[int, int, int] = BG) -> np.ndarray:
    return np.full((h, w, 3), bg, np.uint8)


def triangle(img: np.ndarray, x: int, y: int, s: int, colour: tuple[int, int, int]) -> np.ndarray:
    cv2.fillPoly(img, [np.array([[x, y + s], [x + s, y + s], [x + s // 2, y]])], colour)
    return img


def scene(shift: int = 0) -> np.ndarray:
    """A red square, a blue circle and a green triangle; ``shift`` moves them all right."""
    img = canvas()
    img[8:24, 6 + shift : 22 + shift] = RED
    cv2.circle(img, (44 + shift, 18), 9, BLUE, -1)
    return triangle(img, 20 + shift, 34, 22, GREEN)


def outline(img: np.ndarray, box: list[int], colour: tuple[int, int, int]) -> np.ndarray:
    """Draw box ``[x0, y0, x1, y1]`` (exclusive) as a one-pixel outline on its border pixels."""
    x0, y0, x1, y1 = box
    cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), colour, 1)
    return img


# ----------------------------------------------------------------------------- inpainting


def test_inpainting_ground_truth_is_perfect_and_wrong_fills_are_worse() -> None:
    target = scene()
    mask = np.zeros((64, 64), np.uint8)
    mask[4:28, 2:30] = 255  # the hole covers the red square
    gt = inpainting_scores(target, target, mask)
    assert gt == pytest.approx(
        {"psnr_in": PSNR_CAP_DB, "psnr_out": PSNR_CAP_DB, "ssim_in": 1.0, "ssim_out": 1.0}
    )

    blank_hole = target.copy()
    blank_hole[mask > 0] = BG  # the square was not painted back
    wrong = inpainting_scores(blank_hole, target, mask)
    assert wrong["psnr_in"] < 20 and wrong["ssim_in"] < 0.8
    assert wrong["psnr_out"] == PSNR_CAP_DB  # outside untouched

    wrong_colour = target.copy()
    wrong_colour[8:24, 6:22] = BLUE
    assert inpainting_scores(wrong_colour, target, mask)["psnr_in"] < 20

    damaged_outside = target.copy()
    damaged_outside[40:60, 40:60] = 0
    out = inpainting_scores(damaged_outside, target, mask)
    assert out["psnr_in"] == PSNR_CAP_DB and out["psnr_out"] < 25 and out["ssim_out"] < 0.95


def test_inpainting_hole_diagnostics_tell_a_kept_hole_a_colour_fill_and_the_object_apart() -> None:
    target = scene()
    mask = np.zeros((64, 64), bool)
    mask[4:28, 2:30] = True  # 672 pixels; the red square (16 x 16) inside
    source = target.copy()
    source[mask] = (128, 128, 128)  # the hole as the model sees it
    colours = [RED, BLUE, GREEN]

    def diagnostics(output: np.ndarray) -> tuple[float, float]:
        s = inpainting_scores(output, target, mask, source=source, object_rgbs=colours)
        return s["hole_kept"], s["object_iou_in"]

    assert diagnostics(target) == pytest.approx((0.0, 1.0))  # BG and red: neither is the fill's grey
    assert diagnostics(source) == pytest.approx((1.0, 0.0))
    filled = target.copy()
    filled[mask] = RED  # the hole filled with the hidden object's colour: right colour, not its shape
    assert diagnostics(filled) == pytest.approx((0.0, 256 / 672))
    # without the inputs the diagnostics are not reported; a hole that hides no object has no object IoU
    assert set(inpainting_scores(target, target, mask)) == {"psnr_in", "psnr_out", "ssim_in", "ssim_out"}
    empty = np.zeros((64, 64), bool)
    empty[40:60, 2:12] = True
    assert math.isnan(inpainting_scores(target, target, empty, object_rgbs=colours)["object_iou_in"])


def test_inpainting_accepts_model_tensors_and_box_masks() -> None:
    target = scene()
    as_tensor = torch.from_numpy(target).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W) in [-1, 1]
    scores = inpainting_scores(as_tensor, target, [2, 4, 30, 28])
    assert scores["psnr_in"] == PSNR_CAP_DB and scores["ssim_out"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- grounding


def test_grounding_box_outline_scores_iou_one() -> None:
    src = scene()
    box = [4, 6, 24, 26]
    out = outline(src.copy(), box, YELLOW)
    assert grounding_scores(out, YELLOW, box) == {"box_iou": 1.0, "hit@0.5": 1.0}
    assert grounding_scores(out, YELLOW, box, source=src) == {"box_iou": 1.0, "hit@0.5": 1.0}


def test_grounding_wrong_outputs_are_worse() -> None:
    src = scene()
    box = [4, 6, 24, 26]
    shifted = outline(src.copy(), [12, 6, 32, 26], YELLOW)  # 8 px right: IoU = 12*20 / (28*20)
    s = grounding_scores(shifted, YELLOW, box)
    assert s["box_iou"] == pytest.approx(12 / 28) and s["hit@0.5"] == 0.0

    far = outline(src.copy(), [40, 40, 60, 60], YELLOW)
    assert grounding_scores(far, YELLOW, box) == {"box_iou": 0.0, "hit@0.5": 0.0}

    wrong_colour = outline(src.copy(), box, (255, 0, 255))
    assert grounding_scores(wrong_colour, YELLOW, box) == {"box_iou": 0.0, "hit@0.5": 0.0}

    assert grounding_scores(canvas(), YELLOW, box) == {"box_iou": 0.0, "hit@0.5": 0.0}
    assert grounding_scores(src, YELLOW, box, source=src) == {"box_iou": 0.0, "hit@0.5": 0.0}


def test_grounding_psnr_out_scores_only_the_pixels_the_overlay_keeps() -> None:
    src = scene()
    box = [4, 6, 24, 26]
    target = outline(src.copy(), box, YELLOW)
    assert "psnr_out" not in grounding_scores(target, YELLOW, box, source=src)  # no target: nothing to compare
    exact = grounding_scores(target, YELLOW, box, source=src, target=target)
    assert exact["box_iou"] == 1.0 and exact["psnr_out"] == PSNR_CAP_DB
    # an output that draws nothing but copies the source keeps every kept pixel: psnr_out unchanged
    assert grounding_scores(src, YELLOW, box, source=src, target=target)["psnr_out"] == PSNR_CAP_DB
    # the box drawn but the kept pixels damaged: box scores unchanged, psnr_out falls
    damaged = target.copy()
    damaged[40:, 40:] = 255 - damaged[40:, 40:]
    s = grounding_scores(damaged, YELLOW, box, source=src, target=target)
    assert s["box_iou"] == 1.0 and s["psnr_out"] < 20
    # a target of another size has no pixel in common with the source: no psnr_out
    assert "psnr_out" not in grounding_scores(target, YELLOW, box, source=src, target=target[:-4])


def test_grounding_ignores_stray_pixels_and_bridges_small_gaps() -> None:
    src = scene()
    box = [4, 6, 24, 26]
    out = outline(src.copy(), box, YELLOW)
    out[60, 60] = YELLOW
    out[2, 50] = YELLOW
    out[6, 14] = BG  # a one-pixel gap in the top edge
    assert grounding_scores(out, YELLOW, box)["box_iou"] == 1.0


def test_grounding_with_source_ignores_objects_already_of_the_overlay_colour() -> None:
    src = scene()  # has a red square at [6, 8, 22, 24]
    box = [34, 6, 56, 30]
    out = outline(src.copy(), box, RED)
    assert grounding_scores(out, RED, box, source=src)["box_iou"] == 1.0
    # Without the source the red square is found too, and it is the larger blob.
    assert grounding_scores(out, RED, box)["box_iou"] < 0.5


def test_grounding_semitransparent_mask_needs_the_source() -> None:
    src = scene()
    region = np.zeros((64, 64), bool)
    cv2.circle(region.view(np.uint8), (44, 18), 9, 1, -1)  # the blue circle's pixels
    alpha = 0.5
    out = src.astype(np.float32)
    out[region] = alpha * np.array(YELLOW, np.float32) + (1 - alpha) * out[region]
    out = out.round().astype(np.uint8)
    ys, xs = np.nonzero(region)
    box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    assert grounding_scores(out, YELLOW, box, source=src, alpha=alpha)["box_iou"] == 1.0
    assert grounding_scores(src, YELLOW, box, source=src, alpha=alpha)["box_iou"] == 0.0
    with pytest.raises(ValueError, match="source"):
        grounding_scores(out, YELLOW, box, alpha=alpha)


def test_grounding_every_instance() -> None:
    src = canvas()
    boxes = [[2, 2, 14, 14], [30, 4, 44, 20], [10, 40, 30, 60]]
    out = src.copy()
    for b in boxes:
        outline(out, b, RED)
    assert grounding_scores(out, RED, boxes, source=src) == {"box_iou": 1.0, "hit@0.5": 1.0}

    missing = src.copy()
    for b in boxes[:2]:
        outline(missing, b, RED)
    assert grounding_scores(missing, RED, boxes, source=src)["box_iou"] == pytest.approx(2 / 3)

    extra = out.copy()
    outline(extra, [48, 44, 62, 62], RED)
    s = grounding_scores(extra, RED, boxes, source=src)
    assert s["box_iou"] == pytest.approx(3 / 4) and s["hit@0.5"] == pytest.approx(3 / 4)


def test_grounding_separates_touching_and_crossing_instance_boxes() -> None:
    src = canvas(32, 32)
    touching = [[8, 16, 15, 23], [13, 1, 27, 15]]  # one pixel row apart
    crossing = [[16, 18, 24, 26], [19, 23, 27, 31], [3, 18, 10, 25]]  # the first two overlap
    for boxes in (touching, crossing):
        out = src.copy()
        for b in boxes:
            outline(out, b, RED)
        assert grounding_scores(out, RED, boxes, source=src) == {"box_iou": 1.0, "hit@0.5": 1.0}


def test_grounding_box_on_the_image_border() -> None:
    src = canvas(32, 32)
    box = [0, 17, 15, 32]
    out = outline(src.copy(), box, RED)
    assert grounding_scores(out, RED, box, source=src)["box_iou"] == 1.0
    filled = src.copy()
    filled[0:8, 3:11] = RED
    assert grounding_scores(filled, RED, [3, 0, 11, 8], source=src)["box_iou"] == 1.0


def test_box_iou_uses_exclusive_ends() -> None:
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0


# ----------------------------------------------------------------------------- control


def test_control_ground_truth_is_perfect_for_a_canny_condition() -> None:
    target = scene()
    condition = canny_edges(target).astype(np.uint8) * 255  # stored as a white-on-black map
    gt = control_scores(target, target, condition)
    assert gt == pytest.approx({"psnr": PSNR_CAP_DB, "ssim": 1.0, "edge_f1": 1.0})
    rgb_condition = np.repeat(condition[:, :, None], 3, axis=2)  # same map as an RGB image
    assert control_scores(target, target, rgb_condition)["edge_f1"] == 1.0


def test_control_wrong_outputs_are_worse() -> None:
    target = scene()
    condition = canny_edges(target)
    shifted = control_scores(scene(shift=6), target, condition)
    assert shifted["edge_f1"] < 0.5 and shifted["psnr"] < 20 and shifted["ssim"] < 0.9
    one_px = control_scores(scene(shift=1), target, condition)
    assert one_px["edge_f1"] > 0.9  # within the pixel tolerance
    blank = control_scores(canvas(), target, condition)
    assert blank["edge_f1"] == 0.0


def test_control_segmentation_condition_scores_against_the_target_edges() -> None:
    target = scene()
    seg = canvas(bg=(0, 0, 0))  # a colour segmentation map of the same scene
    seg[8:24, 6:22] = (60, 180, 75)
    cv2.circle(seg, (44, 18), 9, (220, 20, 60), -1)
    triangle(seg, 20, 34, 22, (255, 225, 25))
    gt = control_scores(target, target, seg)
    assert gt["edge_f1"] == 1.0
    assert control_scores(scene(shift=6), target, seg)["edge_f1"] < 0.5
    assert control_scores(canvas(), target, seg)["edge_f1"] == 0.0


# ----------------------------------------------------------------------------- customized


def _reference() -> tuple[np.ndarray, np.ndarray]:
    ref = triangle(canvas(48, 48), 14, 14, 20, RED)
    mask = np.zeros((48, 48), bool)
    mask[14:35, 14:35] = True
    return ref, mask


def test_customized_ground_truth_scores_one() -> None:
    ref, mask = _reference()
    out = triangle(canvas(), 30, 6, 20, RED)  # same subject, elsewhere, with another object
    cv2.circle(out, (15, 50), 8, BLUE, -1)
    s = customized_scores(out, ref, mask, named_colors_rgb=[RED, BLUE], named_shapes=["triangle", "circle"])
    assert s["subject_ncc"] == pytest.approx(1.0, abs=1e-4) and s["prompt_fidelity"] == 1.0
    assert customized_scores(out, ref, [14, 14, 35, 35])["subject_ncc"] == pytest.approx(1.0, abs=1e-4)
    rescaled = triangle(canvas(), 10, 10, 28, RED)  # 1.4x the reference size
    assert customized_scores(rescaled, ref, mask)["subject_ncc"] > 0.9


def test_customized_wrong_outputs_are_worse() -> None:
    ref, mask = _reference()
    blue = customized_scores(triangle(canvas(), 30, 6, 20, BLUE), ref, mask, named_colors_rgb=[RED])
    assert blue["subject_ncc"] < 0.8 and blue["prompt_fidelity"] == 0.0
    circle = canvas()
    cv2.circle(circle, (40, 16), 10, RED, -1)
    c = customized_scores(circle, ref, mask, named_colors_rgb=[RED], named_shapes=["triangle"])
    assert c["subject_ncc"] < 0.8 and c["prompt_fidelity"] == 0.0
    blank = customized_scores(canvas(), ref, mask, named_colors_rgb=[RED])
    assert blank == {"subject_ncc": 0.0, "prompt_fidelity": 0.0}


def patterned_subject(
    bg: tuple[int, int, int], x: int, y: int, r: int, colours=(RED, BLUE)
) -> tuple[np.ndarray, np.ndarray]:
    """A ShapeWorld-like subject: a circle split vertically into two colours, on a background."""
    img = canvas(bg=bg)
    disc = np.zeros((64, 64), np.uint8)
    cv2.circle(disc, (x, y), r, 1, -1)
    left = disc.astype(bool) & (np.arange(64)[None, :] < x)
    img[left] = colours[0]
    img[disc.astype(bool) & ~left] = colours[1]
    return img, disc.astype(bool)


def test_customized_subject_mask_ignores_the_background() -> None:
    ref, mask = patterned_subject((128, 128, 128), 20, 20, 10)
    out, _ = patterned_subject((180, 170, 140), 40, 38, 10)  # same subject, new place and background
    assert customized_scores(out, ref, mask)["subject_ncc"] > 0.99
    bigger, _ = patterned_subject((180, 170, 140), 34, 34, 14)
    assert customized_scores(bigger, ref, mask)["subject_ncc"] > 0.9
    swapped, _ = patterned_subject((180, 170, 140), 40, 38, 10, colours=(BLUE, RED))
    assert customized_scores(swapped, ref, mask)["subject_ncc"] < 0.8


def test_prompt_fidelity_counts_named_items() -> None:
    img = scene()
    assert prompt_fidelity(img, [RED, BLUE, GREEN], ["square", "circle", "triangle"]) == 1.0
    assert prompt_fidelity(img, [RED, BLUE, GREEN, YELLOW]) == 0.75
    assert prompt_fidelity(img, [RED, BLUE], ["circle", "square"]) == 0.0
    assert prompt_fidelity(img, [GREEN], ["diamond"]) == 0.0
    assert math.isnan(prompt_fidelity(img, []))
    with pytest.raises(ValueError, match="supported shapes"):
        prompt_fidelity(img, [RED], ["pentagon"])


@pytest.mark.parametrize("radius", [6, 9, 14, 20])
def test_classify_shape_on_rasterised_shapes(radius: int) -> None:
    for name, unit in SHAPE_PROTOTYPES.items():
        for dx, dy in [(0.0, 0.0), (0.3, 0.6), (0.5, 0.25)]:
            img = np.zeros((64, 64), np.uint8)
            poly = unit * radius + np.array([32 + dx, 32 + dy])
            cv2.fillPoly(img, [np.round(poly * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
            assert classify_shape(img.astype(bool)) == name, (name, radius, dx, dy)


def test_classify_shape_with_custom_prototypes() -> None:
    img = np.zeros((40, 40), np.uint8)
    img[5:15, 5:35] = 1  # a wide bar
    bar = np.array([[-1.0, -0.2], [1.0, -0.2], [1.0, 0.2], [-1.0, 0.2]])
    prototypes = {"bar": bar, "circle": SHAPE_PROTOTYPES["circle"]}
    # A shape outside the built-in set is recognised once its prototype is given.
    assert classify_shape(img.astype(bool), prototypes) == "bar"


# ----------------------------------------------------------------------------- editing


def square_made_blue() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An edit of ``scene()``, "make the square blue": source, target and the edited region."""
    source = scene()
    target = source.copy()
    target[8:24, 6:22] = BLUE
    region = np.zeros((64, 64), np.uint8)
    region[8:24, 6:22] = 255
    return source, target, region


def test_objects_kept_sees_an_edit_that_erases_what_it_should_leave_alone() -> None:
    source, target, region = square_made_blue()
    objects = [RED, BLUE, GREEN]
    assert editing_scores(target, source, target, region, objects)["objects_kept"] == 1.0
    erased = target.copy()
    erased[(source == GREEN).all(-1)] = BG  # the edit done, the triangle gone
    scores = editing_scores(erased, source, target, region, objects)
    assert scores["preservation"] > 0.9  # the pixel mean barely notices
    blue_kept = (source == BLUE).all(-1).sum() / ((source == BLUE).all(-1).sum() + (source == GREEN).all(-1).sum())
    assert scores["objects_kept"] == pytest.approx(blue_kept)
    assert scores["objects_kept"] < 0.5
    assert "objects_kept" not in editing_scores(target, source, target, region)  # no colours given
    no_objects = editing_scores(canvas(), canvas(), canvas(), region, objects)
    assert math.isnan(no_objects["objects_kept"])


def test_editing_scores() -> None:
    source, target, region = square_made_blue()
    gt = editing_scores(target, source, target, region)
    assert gt == {"edit_success": 1.0, "preservation": 1.0, "edit_l1": 0.0}

    nothing = editing_scores(source, source, target, region)
    assert nothing["edit_success"] == 0.0 and nothing["preservation"] == 1.0

    half = source.copy()
    half[8:24, 6:22] = (np.array(RED) + np.array(BLUE)) // 2  # half way to the target colour
    assert editing_scores(half, source, target, region)["edit_success"] == pytest.approx(0.5, abs=0.01)

    wrong_colour = source.copy()
    wrong_colour[8:24, 6:22] = GREEN
    assert editing_scores(wrong_colour, source, target, region)["edit_success"] < 0.5

    blank = editing_scores(np.zeros_like(source), source, target, region)
    assert blank["edit_success"] < 0.5 and blank["preservation"] < 0.9

    spill = target.copy()
    spill[40:60, 40:60] = 0
    assert editing_scores(spill, source, target, region)["preservation"] < 0.95


# ----------------------------------------------------------------------------- aggregate


def test_aggregate_means_skip_nan_and_missing() -> None:
    rows = [{"a": 1.0, "b": float("nan"), "key": "x"}, {"a": 3.0, "b": 2.0}, {"c": True}]
    out = aggregate(rows)
    assert out == {"a": 2.0, "b": 2.0, "c": 1.0}
    assert math.isnan(aggregate([{"a": float("nan")}])["a"])
