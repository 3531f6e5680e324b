"""Data never turns into something else in the output frame: the FLUX configs keep aspect ratios (buckets), and
whatever the frame, the builders refuse (`crop`) an edit, a referent or a subject the crop loses, and the validator
reports the same refusals for the frame a config uses."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from cologen.data.builders import BuilderConfig, TaskBuilder
from cologen.data.geometry import box_visible, fit_frame, make_buckets, output_size
from cologen.data.manifest import ShardWriter
from cologen.data.records import BadSample, Sample
from data_recipes import check

CONFIGS = sorted((Path(__file__).parent.parent / "experiments" / "flux_dev").glob("data_stage*.yaml"))
SQUARE_512 = TaskBuilder(resolution=512)
BUCKETS_512 = TaskBuilder(resolution=512, buckets=make_buckets(512))


def _rng():
    return np.random.default_rng(0)


def _photo(w, h, seed=0):
    """A textured image (no flat areas), so pixel differences come only from what a test paints."""
    rng = np.random.default_rng(seed)
    return cv2.resize(rng.integers(40, 200, (h // 8, w // 8, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_LINEAR)


def _omniedit_pair(edit_x=(20, 160)):
    """An OmniEdit-sized pair (1024 x 576, JPEG-like noise everywhere) whose edit lies at x 20-160."""
    source = _photo(1024, 576)
    target = np.clip(source.astype(int) + np.random.default_rng(1).integers(-3, 4, source.shape), 0, 255).astype(np.uint8)
    target[200:400, edit_x[0]:edit_x[1]] = (30, 200, 30)
    record = {"task": "editing", "prompt": "add a green block on the left", "width": 1024, "height": 576,
              "edit": {"operation": "add", "instruction": "add a green block on the left"}}
    return Sample("omniedit-0", "", record, target, source=source)


def _changed_pixels(ex):
    return int((np.abs(ex["target"].astype(int) - ex["source"].astype(int)).max(axis=2) > 32).sum())


def _refcoco_man_on_left():
    """RefCOCO's 'man on left': box [10, 20, 111, 171] (x0, y0, x1, y1) in a 640 x 427 image."""
    record = {"task": "grounding", "prompt": "man on left", "width": 640, "height": 427,
              "objects": [{"class": "person", "box": [10, 20, 111, 171]}],
              "grounding": {"expression": "man on left", "class": "person", "box": [10, 20, 111, 171],
                            "instances": [[10, 20, 111, 171]], "object_index": 0}}
    return Sample("refcoco-0", "", record, _photo(640, 427))


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_flux_dev_data_configs_keep_aspect_ratios(path):
    args = yaml.safe_load(path.read_text())["data"]["init_args"]
    assert args["aspect_buckets"] is True and args["resolution"] == 512


def test_an_image_is_scaled_only_as_much_as_its_bucket_needs():
    buckets = make_buckets(512)
    for w, h in [(640, 427), (1024, 576), (200, 100), (300, 300), (4000, 1000)]:
        bw, bh = output_size(w, h, 512, buckets)
        frame = fit_frame(w, h, bw, bh)
        least = max(bw / w, bh / h)  # the least factor that covers the bucket: small images are upscaled to it
        assert abs(frame.scale_x - least) < 0.01 and abs(frame.scale_y - least) < 0.01
        if w / h <= 2:  # within the buckets' ratios, the crop is the bucket's rounding: a few pixels
            assert round(w * frame.scale_x) - bw <= 0.03 * bw and round(h * frame.scale_y) - bh <= 0.03 * bh


# -------------------------------------------------------------------------------------------- refusals


def test_an_edit_the_square_crop_loses_is_refused_and_buckets_keep_it():
    sample = _omniedit_pair()
    with pytest.raises(BadSample) as e:
        SQUARE_512(sample, "editing", _rng())  # today: a pair with 0 changed pixels, trained as an edit
    assert e.value.category == "crop" and "the edit: 0% of it inside the 512x512 frame" in e.value.reason
    ex = BUCKETS_512(sample, "editing", _rng())
    assert ex["target"].shape[1] > ex["target"].shape[0] and _changed_pixels(ex) > 0.8 * 140 * 200 * (ex[
        "target"].shape[0] / 576) ** 2
    # an edit in the middle survives the square crop too
    assert _changed_pixels(SQUARE_512(_omniedit_pair(edit_x=(450, 600)), "editing", _rng())) > 0


def test_an_edit_region_given_as_a_mask_decides():
    sample = _omniedit_pair(edit_x=(450, 600))
    sample.mask = np.zeros((576, 1024), np.uint8)
    sample.mask[200:400, 20:160] = 255  # the dataset says the edit is on the left
    with pytest.raises(BadSample, match="the edit: 0% of it"):
        SQUARE_512(sample, "editing", _rng())


def test_a_referent_mostly_outside_the_frame_is_refused():
    sample = _refcoco_man_on_left()
    assert box_visible(sample.record["grounding"]["box"], SQUARE_512.frame_for(640, 427)) < 0.1  # 5 of its 101 px columns
    with pytest.raises(BadSample) as e:
        SQUARE_512(sample, "grounding", _rng())  # today: trained with box [0, 23, 7, 206]
    assert e.value.category == "crop" and "the grounded object: 5% of it" in e.value.reason
    ex = BUCKETS_512(sample, "grounding", _rng())
    x0, y0, x1, y1 = ex["meta"]["build"]["box"]
    assert (x1 - x0) >= 0.95 * 101 * ex["target"].shape[1] / 640
    # the threshold is configurable
    lenient = TaskBuilder(BuilderConfig(min_visible=0.04), resolution=512)
    assert lenient(sample, "grounding", _rng())["meta"]["build"]["box"][2] == 7


def test_class_boxes_refuse_a_sliver_of_an_instance():
    sample = _refcoco_man_on_left()
    g = sample.record["grounding"]
    g["box"] = [300, 50, 400, 300]  # the referent is in the middle ...
    g["instances"] = [[300, 50, 400, 300], [10, 20, 111, 171]]  # ... another instance is a sliver in the frame
    boxes = TaskBuilder(BuilderConfig(overlay_kinds={"box": 1.0}), resolution=512)
    assert boxes(sample, "grounding", _rng())["meta"]["build"]["overlay"] == "box"
    every = TaskBuilder(BuilderConfig(overlay_kinds={"class_boxes": 1.0}), resolution=512)
    with pytest.raises(BadSample, match="an instance of the class"):
        every(sample, "grounding", _rng())
    g["instances"][1] = [0, 0, 40, 40]  # wholly outside the frame: "every instance" is still unambiguous
    assert len(every(sample, "grounding", _rng())["meta"]["build"]["boxes"]) == 1


def _subject_pair(target_box, reference_box, size=(1024, 512)):
    w, h = size
    image, source = _photo(w, h, 1), _photo(w, h, 2)
    mask, source_mask = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
    mask[target_box[1]:target_box[3], target_box[0]:target_box[2]] = 255
    source_mask[reference_box[1]:reference_box[3], reference_box[0]:reference_box[2]] = 255
    record = {"task": "customized", "prompt": "the subject on a beach", "width": w, "height": h,
              "subject": {"id": "s0", "target_description": "the subject on a beach"}}
    return Sample("subject-0", "", record, image, source=source, mask=mask, source_mask=source_mask)


def test_a_subject_the_crop_loses_is_refused():
    centre = (400, 100, 600, 400)
    assert SQUARE_512(_subject_pair(centre, centre), "customized", _rng())["region"].any()
    left = (0, 100, 200, 400)
    with pytest.raises(BadSample, match="the subject in the target: 0% of it"):
        SQUARE_512(_subject_pair(left, centre), "customized", _rng())
    with pytest.raises(BadSample, match="the subject in the reference: 0% of it"):
        SQUARE_512(_subject_pair(centre, left), "customized", _rng())
    assert BUCKETS_512(_subject_pair(left, left), "customized", _rng())["region"].any()


def test_objects_the_crop_cuts_to_a_sliver_do_not_shape_inpainting_masks():
    record = {"task": "inpainting", "prompt": "a man", "caption": "a man", "width": 640, "height": 427,
              "objects": [{"class": "person", "box": [10, 20, 111, 171]}]}
    sample = Sample("coco-0", "", record, _photo(640, 427))
    object_masks = TaskBuilder(BuilderConfig(mask_kinds={"object": 1.0}), resolution=512)
    ex = object_masks(sample, "inpainting", _rng())
    assert ex["meta"]["build"]["mask_kind"] == "random" and ex["meta"]["build"]["mask_fallback"] == "objects cropped"
    assert ex["region"].any()
    bucketed = TaskBuilder(BuilderConfig(mask_kinds={"object": 1.0}), resolution=512, buckets=make_buckets(512))
    assert bucketed(sample, "inpainting", _rng())["meta"]["build"]["mask_kind"] == "object"


# ---------------------------------------------------------------------------------------------- validator


def _write(path, samples):
    with ShardWriter(path) as w:
        for s in samples:
            members = [("json", json.dumps(s.record).encode()), ("image.png", cv2.imencode(".png", s.image)[1].tobytes())]
            if s.source is not None:
                members.append(("source.png", cv2.imencode(".png", s.source)[1].tobytes()))
            w.write(s.key, members)
    return str(path)


def test_the_validator_reports_refusals_for_the_frame_of_a_config(tmp_path, capsys):
    url = _write(tmp_path / "real.tar", [_refcoco_man_on_left(), _omniedit_pair()])
    assert check.main([url]) == 0  # 32 px square: refused, listed, not malformed
    out = capsys.readouterr().out
    assert "SKIP " in out and "refcoco-0 [crop] the grounded object" in out and "omniedit-0 [crop] the edit" in out
    assert "2 refused in this frame" in out
    assert check.main([url, "--resolution", "512"]) == 0
    assert "2 refused in this frame (crop 2)" in capsys.readouterr().out
    stage = next(p for p in CONFIGS if p.stem == "data_stage1")
    assert check.main([url, "--config", str(stage)]) == 0  # 512 px buckets: nothing lost
    out = capsys.readouterr().out
    assert "[crop]" not in out and "aspect buckets of ~512^2 px" in out and "2 good samples" in out
