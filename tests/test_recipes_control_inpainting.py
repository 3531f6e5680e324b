"""MultiGen-20M (depth, segmentation, edge tables), inpainting sources (text-to-image tars, COCO-format
instances) on schema-exact fixtures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cologen.testing import recipe_fixtures as F
from data_recipes import inpainting, multigen


def _multigen(tmp_path, kind, *extra, bad=True):
    parquet = F.write_parquet(F.multigen_table(kind, 3, bad=bad), tmp_path / kind / "train-00000.parquet")
    out = tmp_path / f"out_{kind}"
    summary = multigen.main(["--input", str(parquet), "--output", str(out), "--quiet", *extra])
    return summary, F.read_samples(out)


def test_multigen_depth(tmp_path):
    summary, samples = _multigen(tmp_path, "depth")
    assert summary.samples == 3 and summary.skipped == {"missing control_depth bytes": 1}
    s = samples[0]
    rec = s["json"]
    assert rec["task"] == "control" and rec["control"] == {"types": ["depth"]} and rec["prompt"] == "a room 0"
    depth = F.decode(s["depth.png"])
    assert depth.shape == (64, 64) and depth[0, 0] == 0 and depth[-1, 0] == 255
    assert "eval" not in rec


def test_multigen_segmentation_keeps_labels(tmp_path):
    summary, samples = _multigen(tmp_path, "seg", "--dataset", "captioned_ade20k")
    assert summary.samples == 3 and summary.skipped == {"missing control_seg bytes": 1}
    s = samples[0]
    assert s["json"]["control"] == {"types": ["seg"]} and s["json"]["dataset"] == "captioned_ade20k"
    seg, labels = F.decode(s["seg.png"]), F.decode(s["labels.png"])
    assert seg.shape == (64, 64, 3) and tuple(seg[20, 20]) == (120, 120, 80)
    assert labels.shape == (64, 64) and labels[20, 20] == 7 and labels[0, 0] == 0


def test_multigen_edge_eval_split(tmp_path):
    summary, samples = _multigen(tmp_path, "canny", "--eval", "--types", "canny")
    assert summary.samples == 3 and summary.skipped == {"missing image bytes": 1}
    rec = samples[0]["json"]
    assert rec["control"] == {"types": ["canny"]}
    assert rec["eval"] == {"benchmark": "multigen20m", "split": "eval", "condition": "canny", "has_target": True}
    assert set(samples[0]) == {"__key__", "__shard__", "json", "image.jpg"}


def test_inpainting_from_text_to_image_tars(tmp_path):
    tars = F.t2i_tars(tmp_path / "t2i", n_tars=2, per_tar=3, bad=True)
    out = tmp_path / "out"
    summary = inpainting.main(["--input", str(tmp_path / "t2i"), "--output", str(out), "--shard-size", "4",
                               "--quiet"])
    assert summary.rows_read == 8
    assert summary.samples == 6 and summary.skipped == {"missing prompt": 1, "missing image bytes": 1}
    samples = F.read_samples(out)
    rec = samples[0]["json"]
    assert rec["task"] == "inpainting" and rec["prompt"] == "a painting 0-0" and (rec["width"], rec["height"]) == (64, 64)
    assert rec["origin"] == {"key": "000000000", "tar": tars[0].name}
    assert samples[0]["image.jpg"] == F.encode(F.draw_image(64, 64, 0))


def test_inpainting_from_coco_instances(tmp_path):
    coco = F.add_bad_annotations(F.coco_like(tmp_path / "coco", n_images=2, folder="train2017",
                                             file_pattern="{:012d}.jpg"))
    ann = tmp_path / "instances_train2017.json"
    ann.write_text(json.dumps(coco))
    caps = tmp_path / "captions_train2017.json"
    caps.write_text(json.dumps({"annotations": [{"image_id": 100, "id": 1, "caption": "two dogs and a man"}]}))
    out = tmp_path / "out"
    summary = inpainting.main(["--input", str(ann), "--images", str(tmp_path / "coco"), "--captions", str(caps),
                               "--output", str(out), "--quiet"])
    assert summary.samples == 2 and summary.skipped == {"object dropped: box outside the image": 1}
    s0, s1 = F.read_samples(out)
    assert s0["json"]["prompt"] == "two dogs and a man"
    assert s1["json"]["prompt"] == "a photo of a dog and a person"  # no caption: the classes
    objects = s0["json"]["objects"]
    assert [o["class"] for o in objects] == ["dog", "person", "dog"]  # largest first; the crowd one is left out
    inst = F.decode(s0["instances.png"])
    assert inst.shape == (64, 96) and inst.dtype == np.uint8
    for i, o in enumerate(objects, start=1):
        x0, y0, x1, y1 = o["box"]
        ys, xs = np.nonzero(inst == i)
        assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
        assert o["area"] == pytest.approx((inst == i).sum(), rel=0.2)


def test_inpainting_crowd_rle_objects(tmp_path):
    coco = F.coco_like(tmp_path / "coco", n_images=1, folder="train2017", file_pattern="{:012d}.jpg")
    ann = tmp_path / "stuff.json"
    ann.write_text(json.dumps(coco))
    out = tmp_path / "out"
    inpainting.main(["--input", str(ann), "--images", str(tmp_path / "coco"), "--keep-crowd",
                     "--output", str(out), "--quiet"])
    s = F.read_samples(out)[0]
    crowd = [i for i, o in enumerate(s["json"]["objects"], start=1) if o.get("crowd")]
    assert len(crowd) == 1 and s["json"]["objects"][crowd[0] - 1]["class"] == "chair"
    region = F.decode(s["instances.png"]) == crowd[0]
    assert region.sum() == 100 and region[50:60, 0:10].all()  # the RLE's 10 x 10 square


def test_inpainting_rejects_mixed_inputs(tmp_path):
    F.t2i_tars(tmp_path / "t2i", n_tars=1, per_tar=1)
    (tmp_path / "t2i" / "x.json").write_text("{}")
    with pytest.raises(SystemExit):
        inpainting.main(["--input", str(tmp_path / "t2i"), "--output", str(tmp_path / "o")])
