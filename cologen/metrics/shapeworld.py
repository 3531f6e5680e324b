"""ShapeWorld metrics: each task scored against exact ground truth.

Pure functions on images plus explicit ground-truth arguments, so they do not depend on how the
data pipeline stores or builds samples. Images are anything ``to_uint8_rgb`` accepts (PIL,
``uint8`` ``H x W x 3`` numpy, float tensors ``(3, H, W)`` in ``[-1, 1]``); they are converted
once, at the top of each function. Boxes are ``[x0, y0, x1, y1]`` in pixels with exclusive ends
(docs/data.md). Masks are bool arrays, ``uint8`` / PIL with 255 (or, in a 0/1 array, 1) = region,
or a box. Every score is written out with its range and direction in docs/metrics.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import cv2
import numpy as np
from scipy.optimize import linear_sum_assignment

from cologen.metrics.edges import EDGE_TOLERANCE_PX, as_edge_map, canny_edges, edge_f1
from cologen.metrics.images import ImageLike, MaskLike, to_mask, to_uint8_rgb
from cologen.metrics.outlines import outline_boxes
from cologen.metrics.pixel import l1, psnr, ssim
from cologen.metrics.shapes import classify_shape, known_shapes

Box = Sequence[float]
RGB = Sequence[int]

COLOR_TOLERANCE = 40  # max per-channel difference (0-255) for a pixel to count as a named colour
NCC_SCALES = (0.5, 0.6, 0.7, 0.85, 1.0, 1.2, 1.4, 1.7, 2.0)


# ----------------------------------------------------------------------------- inpainting


def inpainting_scores(output: ImageLike, target: ImageLike, mask: MaskLike, source: ImageLike | None = None,
                      object_rgbs: Sequence[RGB] = (), tolerance: int = COLOR_TOLERANCE) -> dict[str, float]:
    """PSNR (dB) and SSIM of ``output`` against ``target`` inside the mask (the hole that was
    filled) and outside it (what should have been kept).

    Two diagnostics of the hole say why its PSNR is what it is. With ``source`` (the image with the hole):
    ``hole_kept``, the share of the hole's pixels the output leaves as the source shows them (every channel
    within ``tolerance``; a copy of the source scores 1). With ``object_rgbs`` (the scene's object colours):
    ``object_iou_in``, per object colour the target shows in the hole, the IoU within the hole of the output's
    pixels of that colour with the target's (mean over those colours; NaN when the hole hides none), so an
    object drawn where and as the scene has it scores 1 and the hole filled with its colour scores its share of
    the hole."""
    out, tgt = to_uint8_rgb(output), to_uint8_rgb(target)
    region = to_mask(mask, out.shape[:2])
    scores = {
        "psnr_in": psnr(out, tgt, region),
        "psnr_out": psnr(out, tgt, ~region),
        "ssim_in": ssim(out, tgt, region),
        "ssim_out": ssim(out, tgt, ~region),
    }
    if source is not None:
        src = to_uint8_rgb(source)
        kept = np.abs(out.astype(np.int16) - src.astype(np.int16)).max(axis=2) <= tolerance
        scores["hole_kept"] = float(kept[region].mean()) if region.any() else float("nan")
    if len(object_rgbs):
        ious = [both / either for both, either, true in color_overlaps(out, tgt, object_rgbs, tolerance, region) if true]
        scores["object_iou_in"] = float(np.mean(ious)) if ious else float("nan")
    return scores


def color_overlaps(output: ImageLike, target: ImageLike, object_rgbs: Sequence[RGB], tolerance: int = COLOR_TOLERANCE,
                   within: np.ndarray | None = None) -> list[tuple[int, int, int]]:
    """Per distinct colour of ``object_rgbs`` (sorted): the pixel counts of output-and-target, output-or-target and
    target in that colour, within the bool mask ``within`` (every pixel without it). An IoU is the first over the
    second."""
    out, tgt = to_uint8_rgb(output), to_uint8_rgb(target)
    counts = []
    for rgb in sorted({tuple(int(c) for c in rgb) for rgb in object_rgbs}):
        drawn, true = color_mask(out, rgb, tolerance), color_mask(tgt, rgb, tolerance)
        if within is not None:
            drawn, true = drawn & within, true & within
        counts.append((int((drawn & true).sum()), int((drawn | true).sum()), int(true.sum())))
    return counts


# ----------------------------------------------------------------------------- text-to-image (the base)


def t2i_scores(output: ImageLike, target: ImageLike, object_rgbs: Sequence[RGB],
               tolerance: int = COLOR_TOLERANCE) -> dict[str, float]:
    """How well a scene drawn from its caption places its objects: ``object_iou``, the IoU of the output's pixels
    of each object colour with the target's (mean over the scene's distinct object colours; each colour's pixels
    are where the caption's objects of that colour lie, so position, size and shape all count and a blob of the
    right colour in the wrong place scores 0), and ``psnr`` against the target. The scene's own caption is the
    prompt, so the target is one of the images it describes (objects' exact positions within a named region vary)."""
    ious = [both / either if either else 1.0 for both, either, _ in color_overlaps(output, target, object_rgbs,
                                                                                  tolerance)]
    return {"object_iou": float(np.mean(ious)) if ious else float("nan"),
            "psnr": psnr(to_uint8_rgb(output), to_uint8_rgb(target))}


# ----------------------------------------------------------------------------- grounding


def changed_pixels(source: ImageLike, target: ImageLike) -> np.ndarray | None:
    """Bool ``H x W``: the pixels where ``target`` differs from ``source`` (what an overlay or an edit drew);
    None when their sizes differ (no pixel of one is a pixel of the other)."""
    src, tgt = to_uint8_rgb(source), to_uint8_rgb(target)
    return (src != tgt).any(axis=2) if src.shape == tgt.shape else None


def color_mask(image: ImageLike, rgb: RGB, tolerance: int = COLOR_TOLERANCE) -> np.ndarray:
    """Bool ``H x W``: pixels whose every channel is within ``tolerance`` of ``rgb``."""
    img = to_uint8_rgb(image).astype(np.int16)
    return np.abs(img - np.asarray(rgb, dtype=np.int16)).max(axis=2) <= tolerance


def overlay_pixels(
    output: ImageLike,
    overlay_rgb: RGB,
    source: ImageLike | None = None,
    alpha: float = 1.0,
    tolerance: int = COLOR_TOLERANCE,
) -> np.ndarray:
    """Pixels of ``output`` that show the overlay.

    Without ``source``: pixels close to ``overlay_rgb`` (opaque overlays only). With ``source``
    (the image the overlay was drawn on): pixels close to ``alpha * overlay + (1 - alpha) *
    source`` that would visibly differ from the source, so objects already of the overlay's
    colour in the scene are not mistaken for the overlay, and semi-transparent masks work.
    """
    out = to_uint8_rgb(output).astype(np.float32)
    colour = np.asarray(overlay_rgb, dtype=np.float32)
    if source is None:
        if alpha < 1.0:
            raise ValueError("a semi-transparent overlay (alpha < 1) can only be found with source=...")
        return np.abs(out - colour).max(axis=2) <= tolerance
    src = to_uint8_rgb(source).astype(np.float32)
    expected = alpha * colour + (1.0 - alpha) * src
    close = np.abs(out - expected).max(axis=2) <= tolerance
    visible = np.abs(expected - src).max(axis=2) > tolerance
    return close & visible


def overlay_boxes(pixels: np.ndarray, min_pixels: int = 4) -> list[tuple[list[int], int]]:
    """Boxes drawn by the overlay pixels: one per 8-connected component of at least
    ``min_pixels`` pixels, as ``([x0, y0, x1, y1], size)`` sorted by size, largest first.

    A 3 x 3 closing first bridges one-pixel gaps in a drawn outline; it never grows a component
    past its bounding box."""
    # Zero padding first: OpenCV's erosion treats outside the image as set, which would let the
    # closing grow a component into the image's last row or column.
    padded = np.pad(pixels.astype(np.uint8), 1)
    closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))[1:-1, 1:-1]
    n, _, stats, _ = cv2.connectedComponentsWithStats(np.ascontiguousarray(closed), connectivity=8)
    found = []
    for i in range(1, n):
        x, y, w, h, size = (int(v) for v in stats[i])
        if size >= min_pixels:
            found.append(([x, y, x + w, y + h], size))
    return sorted(found, key=lambda item: -item[1])


def box_iou(a: Box, b: Box) -> float:
    """IoU of two ``[x0, y0, x1, y1]`` boxes with exclusive ends."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _is_single_box(gt: Box | Sequence[Box]) -> bool:
    return len(gt) == 4 and all(isinstance(v, (int, float, np.integer, np.floating)) for v in gt)


def grounding_scores(
    output: ImageLike,
    overlay_rgb: RGB,
    gt_box: Box | Sequence[Box],
    *,
    source: ImageLike | None = None,
    target: ImageLike | None = None,
    alpha: float = 1.0,
    tolerance: int = COLOR_TOLERANCE,
    min_pixels: int = 4,
) -> dict[str, float]:
    """Find the overlay in ``output`` by its colour and score the box it draws.

    One gt box: the predicted box is the bounding box of the largest overlay component (stray
    pixels elsewhere do not move it); ``box_iou`` is its IoU with ``gt_box``, ``hit@0.5`` is 1 if
    that IoU is at least 0.5. A list of gt boxes (an outline on every instance): the predicted
    boxes are the drawn rectangles (``outlines.outline_boxes``, which separates touching and
    crossing outlines), matched one to one with the gt boxes (Hungarian, maximum total IoU); both
    scores are divided by ``max(#gt, #predicted)`` so missed and extra boxes both cost. No overlay
    found: 0 and 0.

    With ``source`` and ``target`` (the same size), also ``psnr_out``: PSNR against the target on the pixels the
    overlay leaves as they are (target equal to source), what a grounding output must copy.
    """
    scores = _box_scores(output, overlay_rgb, gt_box, source, alpha, tolerance, min_pixels)
    kept = None if source is None or target is None else changed_pixels(source, target)
    if kept is not None:
        scores["psnr_out"] = psnr(to_uint8_rgb(output), to_uint8_rgb(target), ~kept)
    return scores


def _box_scores(output: ImageLike, overlay_rgb: RGB, gt_box: Box | Sequence[Box], source: ImageLike | None,
                alpha: float, tolerance: int, min_pixels: int) -> dict[str, float]:
    pixels = overlay_pixels(output, overlay_rgb, source=source, alpha=alpha, tolerance=tolerance)
    if _is_single_box(gt_box):
        found = overlay_boxes(pixels, min_pixels=1)
        iou = box_iou(found[0][0], gt_box) if found else 0.0
        return {"box_iou": iou, "hit@0.5": float(iou >= 0.5)}
    gts = [list(b) for b in gt_box]  # type: ignore[union-attr]
    preds = outline_boxes(pixels, min_new=min_pixels)
    denominator = max(len(gts), len(preds))
    if denominator == 0:
        return {"box_iou": 1.0, "hit@0.5": 1.0}  # nothing to find and nothing drawn
    if not gts or not preds:
        return {"box_iou": 0.0, "hit@0.5": 0.0}
    ious = np.array([[box_iou(p, g) for p in preds] for g in gts])
    rows, cols = linear_sum_assignment(-ious)
    matched = ious[rows, cols]
    return {
        "box_iou": float(matched.sum() / denominator),
        "hit@0.5": float((matched >= 0.5).sum() / denominator),
    }


# ----------------------------------------------------------------------------- control


def control_scores(
    output: ImageLike,
    target: ImageLike,
    condition: ImageLike | np.ndarray,
    *,
    condition_is_edges: bool | None = None,
    tolerance: float = EDGE_TOLERANCE_PX,
) -> dict[str, float]:
    """PSNR and SSIM of ``output`` to ``target``, and ``edge_f1``: the F1 between the output's
    Canny edges and the edges the condition fixes.

    An edge-map condition (canny: a 2-D array, or an image of white edges on black) is the
    reference as it is. A depth or segmentation map fixes the scene's layout but its own edges
    are not the image's (object contrast, background texture), so for those the reference is the
    target's Canny edges; for a canny condition built from the target the two are the same, and
    the ground truth scores 1 either way. ``condition_is_edges=None`` decides by looking: a 2-D
    array, or an image whose pixels are all black or white, is an edge map.
    """
    out = to_uint8_rgb(output)
    if condition_is_edges is None:
        condition_is_edges = _looks_like_edges(condition)
    ref_edges = as_edge_map(condition) if condition_is_edges else canny_edges(target)
    return {
        "psnr": psnr(out, target),
        "ssim": ssim(out, target),
        "edge_f1": edge_f1(canny_edges(out), ref_edges, tolerance),
    }


def _looks_like_edges(condition: ImageLike | np.ndarray) -> bool:
    if isinstance(condition, np.ndarray) and condition.ndim == 2:
        return True
    rgb = to_uint8_rgb(condition)
    grey = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])
    return bool(grey.all() and np.isin(rgb[..., 0], (0, 255)).all())


# ----------------------------------------------------------------------------- customized


def subject_template(
    reference: ImageLike, subject_mask: MaskLike | None = None, margin: float = 0.15
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(template, template_mask)``: the reference cropped to the subject's box grown by
    ``margin`` of its size on each side (at least one pixel), and the subject's pixels in that
    crop (None without a mask: the whole reference is the template)."""
    ref = to_uint8_rgb(reference)
    if subject_mask is None:
        return ref, None
    region = to_mask(subject_mask, ref.shape[:2])
    if not region.any():
        raise ValueError("subject_mask is empty")
    ys, xs = np.nonzero(region)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    mx, my = max(1, round(margin * (x1 - x0))), max(1, round(margin * (y1 - y0)))
    h, w = region.shape
    window = (slice(max(0, y0 - my), min(h, y1 + my)), slice(max(0, x0 - mx), min(w, x1 + mx)))
    return ref[window], region[window]


def _varies(pixels: np.ndarray) -> bool:
    return pixels.size > 0 and bool(np.ptp(pixels.reshape(-1, 3), axis=0).max() > 0)


def best_ncc(
    output: ImageLike,
    template: np.ndarray,
    template_mask: np.ndarray | None = None,
    scales: Sequence[float] = NCC_SCALES,
) -> float:
    """Best normalized cross-correlation (OpenCV ``TM_CCOEFF_NORMED``: Pearson correlation over the
    window, three channels together) of ``template`` over every position of ``output`` and every
    scale in ``scales`` that fits, in ``[-1, 1]``.

    With ``template_mask`` only the subject's pixels are correlated, so the background behind the
    subject does not count; a subject of one flat colour has no pattern of its own, and then the
    whole crop (subject against its surroundings) is used. A flat window scores 0."""
    out = to_uint8_rgb(output)
    best, fitted = -1.0, False
    for s in scales:
        th, tw = round(template.shape[0] * s), round(template.shape[1] * s)
        if th < 3 or tw < 3 or th > out.shape[0] or tw > out.shape[1]:
            continue
        fitted = True
        interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
        scaled = (
            template
            if (th, tw) == template.shape[:2]
            else cv2.resize(template, (tw, th), interpolation=interp)
        )
        mask = None
        if template_mask is not None:
            m = cv2.resize(template_mask.astype(np.uint8), (tw, th), interpolation=cv2.INTER_NEAREST).astype(
                bool
            )
            if _varies(scaled[m]):
                mask = np.repeat(m[:, :, None], 3, axis=2).astype(np.uint8) * 255
        if mask is None and not _varies(scaled):
            best = max(best, 0.0)  # a flat template correlates with nothing
            continue
        res = cv2.matchTemplate(out, scaled, cv2.TM_CCOEFF_NORMED, mask=mask)
        res = np.where(np.isfinite(res), res, 0.0)
        best = max(best, float(res.max()))
    if not fitted:
        raise ValueError(
            f"no scale in {tuple(scales)} fits a {template.shape[:2]} template into {out.shape[:2]}"
        )
    return float(np.clip(best, -1.0, 1.0))


def shape_present(
    pixels: np.ndarray, shape: str, min_pixels: int, prototypes: Mapping[str, np.ndarray] | None = None
) -> bool:
    """Whether some 8-connected blob of ``pixels`` (at least ``min_pixels``) is classified as
    ``shape`` (see shapes.py)."""
    if shape not in known_shapes(prototypes):
        raise ValueError(f"unknown shape {shape!r}: supported shapes are {sorted(known_shapes(prototypes))}")
    n, labels, stats, _ = cv2.connectedComponentsWithStats(pixels.astype(np.uint8), connectivity=8)
    return any(
        stats[i, cv2.CC_STAT_AREA] >= min_pixels and classify_shape(labels == i, prototypes) == shape
        for i in range(1, n)
    )


def prompt_fidelity(
    output: ImageLike,
    named_colors_rgb: Sequence[RGB],
    named_shapes: Sequence[str | None] | None = None,
    *,
    tolerance: int = COLOR_TOLERANCE,
    min_fraction: float = 0.002,
    shape_prototypes: Mapping[str, np.ndarray] | None = None,
) -> float:
    """Fraction of the prompt's named items present in ``output``. Item i is present when at least
    ``max(4, min_fraction * H * W)`` pixels are within ``tolerance`` of ``named_colors_rgb[i]``
    and, if ``named_shapes[i]`` is given, one connected blob of them has that shape. NaN if
    nothing is named."""
    if not named_colors_rgb:
        return float("nan")
    out = to_uint8_rgb(output)
    shapes = list(named_shapes) if named_shapes is not None else [None] * len(named_colors_rgb)
    if len(shapes) != len(named_colors_rgb):
        raise ValueError("named_shapes must give one entry (or None) per named colour")
    min_pixels = max(4, math.ceil(min_fraction * out.shape[0] * out.shape[1]))
    present = 0
    for rgb, shape in zip(named_colors_rgb, shapes):
        pixels = color_mask(out, rgb, tolerance)
        if pixels.sum() < min_pixels:
            continue
        if shape is None or shape_present(pixels, shape, min_pixels, shape_prototypes):
            present += 1
    return present / len(named_colors_rgb)


def customized_scores(
    output: ImageLike,
    reference_subject: ImageLike,
    subject_mask: MaskLike | None = None,
    named_colors_rgb: Sequence[RGB] = (),
    named_shapes: Sequence[str | None] | None = None,
    *,
    scales: Sequence[float] = NCC_SCALES,
    tolerance: int = COLOR_TOLERANCE,
    shape_prototypes: Mapping[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """``subject_ncc``: best normalized cross-correlation of the reference subject (its pixels in
    ``subject_mask``, a mask or box; the whole reference if None) anywhere in ``output`` at any of
    ``scales``. ``prompt_fidelity``: fraction of the named colours (and shapes) present."""
    template, template_mask = subject_template(reference_subject, subject_mask)
    return {
        "subject_ncc": best_ncc(output, template, template_mask, scales),
        "prompt_fidelity": prompt_fidelity(
            output, named_colors_rgb, named_shapes, tolerance=tolerance, shape_prototypes=shape_prototypes
        ),
    }


def placed_subject_score(
    output: ImageLike, target: ImageLike, subject_mask: MaskLike, *, tolerance: int = COLOR_TOLERANCE,
    max_shift: int = 1,
) -> float:
    """Fraction of the target's subject pixels that ``output`` shows in the target's colour (every channel
    within ``tolerance``), at the best shift of at most ``max_shift`` pixels: the subject, with its pattern,
    drawn where and as large as the prompt asks. A copy of a reference that shows the subject elsewhere scores
    near 0."""
    out, tgt = to_uint8_rgb(output).astype(np.int16), to_uint8_rgb(target).astype(np.int16)
    region = to_mask(subject_mask, out.shape[:2])
    if not region.any():
        return float("nan")
    ys, xs = np.nonzero(region)
    h, w = region.shape
    best = 0.0
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            oy, ox = np.clip(ys + dy, 0, h - 1), np.clip(xs + dx, 0, w - 1)
            close = np.abs(out[oy, ox] - tgt[ys, xs]).max(axis=1) <= tolerance
            best = max(best, float(close.mean()))
    return best


def _grown(box: Box, margin: int, width: int, height: int) -> tuple[slice, slice]:
    x0, y0, x1, y1 = (int(v) for v in box)
    return slice(max(0, y0 - margin), min(height, y1 + margin)), slice(max(0, x0 - margin), min(width, x1 + margin))


def scene_fidelity(
    output: ImageLike,
    items: Sequence[tuple[Sequence[RGB], Box]],
    background_rgb: RGB | None = None,
    background_mask: MaskLike | None = None,
    *,
    tolerance: int = COLOR_TOLERANCE,
    margin: int = 2,
    min_pixels: int = 4,
    background_tolerance: int = 20,
) -> float:
    """Fraction of a prompt's named items that ``output`` shows where the prompt puts them. An item is
    ``(colours, box)``: present when each of its colours covers at least ``min_pixels`` pixels of the box grown
    by ``margin``. The background (``background_rgb`` over ``background_mask``, the pixels no object covers) is
    one more item: present when the output's mean colour there is within ``background_tolerance`` of it per
    channel (a mean, so textures average out). NaN if nothing is named."""
    out = to_uint8_rgb(output)
    h, w = out.shape[:2]
    present, named = 0, 0
    for colours, box in items:
        named += 1
        window = out[_grown(box, margin, w, h)]
        present += all(int(color_mask(window, rgb, tolerance).sum()) >= min_pixels for rgb in colours)
    if background_rgb is not None and background_mask is not None:
        region = to_mask(background_mask, (h, w))
        if region.any():
            named += 1
            mean = out[region].astype(np.float64).mean(axis=0)
            present += bool(np.abs(mean - np.asarray(background_rgb, np.float64)).max() <= background_tolerance)
    return present / named if named else float("nan")


def customized_layout_scores(
    output: ImageLike,
    target: ImageLike,
    subject_mask: MaskLike,
    subject_rgbs: Sequence[RGB],
    subject_box: Box,
    others: Sequence[tuple[RGB, Box]] = (),
    background_rgb: RGB | None = None,
    *,
    tolerance: int = COLOR_TOLERANCE,
) -> dict[str, float]:
    """Customized generation where the target's layout is known exactly (ShapeWorld), so that copying the
    reference scores near 0. ``subject_score``: ``placed_subject_score``. ``prompt_fidelity``:
    ``scene_fidelity`` over the subject (its colours in its box), every other named object (its colour in its
    box) and the background colour (over the pixels outside every object's box)."""
    out = to_uint8_rgb(output)
    h, w = out.shape[:2]
    items: list[tuple[Sequence[RGB], Box]] = [(list(subject_rgbs), subject_box)]
    items += [([rgb], box) for rgb, box in others]
    background = np.ones((h, w), bool)
    for _, box in items:
        background[_grown(box, 1, w, h)] = False
    return {
        "subject_score": placed_subject_score(out, target, subject_mask, tolerance=tolerance),
        "prompt_fidelity": scene_fidelity(out, items, background_rgb, background if background_rgb is not None
                                          else None, tolerance=tolerance),
    }


def layout_iou(output: ImageLike, subject_mask: MaskLike, subject_rgbs: Sequence[RGB], *,
               tolerance: int = COLOR_TOLERANCE) -> float:
    """IoU of the output's pixels in the subject's colours with the subject's pixels in the target: whether the
    subject was drawn where, and as large as, the layout condition says (customized_layout). A copy of the
    reference, whose subject sits in another cell, scores near 0."""
    out = to_uint8_rgb(output)
    drawn = np.zeros(out.shape[:2], bool)
    for rgb in subject_rgbs:
        drawn |= color_mask(out, rgb, tolerance)
    truth = to_mask(subject_mask, drawn.shape)
    union = int((drawn | truth).sum())
    return float((drawn & truth).sum() / union) if union else float("nan")


def two_subjects_scores(output: ImageLike, target: ImageLike, subject_masks: Sequence[MaskLike], *,
                        tolerance: int = COLOR_TOLERANCE) -> dict[str, float]:
    """Two subjects in one scene (two_subjects): ``first_placed`` and ``second_placed``, each subject's
    ``placed_subject_score`` (its pixels, with their pattern, where the prompt puts it), and ``both_placed``, the
    smaller of the two. A copy of either reference, whose subject sits elsewhere and alone, scores near 0."""
    first, second = (placed_subject_score(output, target, m, tolerance=tolerance) for m in subject_masks)
    return {"first_placed": first, "second_placed": second, "both_placed": min(first, second)}


# ----------------------------------------------------------------------------- editing


def objects_kept(output: np.ndarray, source: np.ndarray, outside: np.ndarray,
                 object_rgbs: Sequence[Sequence[int]], match: int = 24, keep: int = 48) -> float:
    """The share of the source's object pixels in ``outside`` (those of one of ``object_rgbs``, every
    channel within ``match``) that ``output`` keeps (every channel within ``keep`` of the source), uint8
    images; NaN when ``outside`` holds none."""
    objects = np.any([color_mask(source, rgb, match) for rgb in object_rgbs], axis=0) & outside
    if not objects.any():
        return float("nan")
    src, out = source.astype(np.int16), output.astype(np.int16)
    return float((np.abs(out - src).max(-1)[objects] <= keep).mean())


def editing_scores(
    output: ImageLike, source: ImageLike, target: ImageLike, region_mask: MaskLike,
    object_rgbs: Sequence[Sequence[int]] = (),
) -> dict[str, float]:
    """``edit_success``: the share of the required change made inside the edited region,
    ``max(0, 1 - L1_in(output, target) / max(L1_in(source, target), 1/255))``: 1 when the region
    equals the target, 0 when it is no closer to the target than the unedited source.
    ``preservation``: ``1 - L1_out(output, source)``, similarity to the source outside the region.
    ``edit_l1``: ``L1_in(output, target)``, the raw distance behind ``edit_success``.
    ``objects_kept`` (with the scene's ``object_rgbs``): the share of the pixels of the objects outside
    the region that the output keeps: a mean over mostly background hides an edit
    that erases the objects it should leave alone (a scene's objects cover a few percent of it).
    L1 is the mean absolute difference in ``[0, 1]`` units."""
    out, src, tgt = to_uint8_rgb(output), to_uint8_rgb(source), to_uint8_rgb(target)
    region = to_mask(region_mask, out.shape[:2])
    d_out = l1(out, tgt, region)
    d_src = l1(src, tgt, region)
    if math.isnan(d_out):  # empty region: nothing was to be edited
        success = float("nan")
    else:
        success = max(0.0, 1.0 - d_out / max(d_src, 1.0 / 255.0))
    outside = l1(out, src, ~region)
    scores = {
        "edit_success": success,
        "preservation": float("nan") if math.isnan(outside) else 1.0 - outside,
        "edit_l1": d_out,
    }
    if len(object_rgbs):
        scores["objects_kept"] = objects_kept(out, src, ~region, object_rgbs)
    return scores


# ----------------------------------------------------------------------------- aggregation


def aggregate(rows: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Mean of every numeric key over the rows that have a finite value for it (NaN marks "not
    measurable for this sample" and is skipped); NaN if no row has one."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for row in rows:
        for key, value in row.items():
            if not isinstance(value, (bool, int, float, np.integer, np.floating, np.bool_)):
                continue
            sums.setdefault(key, 0.0)
            counts.setdefault(key, 0)
            if math.isfinite(float(value)):
                sums[key] += float(value)
                counts[key] += 1
    return {k: (sums[k] / counts[k] if counts[k] else float("nan")) for k in sums}
