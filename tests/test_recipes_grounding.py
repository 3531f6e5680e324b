"""Grounding recipes on schema-exact fixtures: RefCOCO annotation tables + a COCO folder, the lmms-lab
evaluation tables, and LVIS JSON. Boxes must come out as [x0, y0, x1, y1], absolute, exclusive."""

from __future__ import annotations

import json

import pytest

from cologen.testing import recipe_fixtures as F
from data_recipes import lvis, refcoco
from data_recipes._coco import _rle_counts_from_string, rle_to_mask, segmentation_mask, xywh_to_box
from data_recipes._rows import Skip

# The fixture's three annotations per image, COCO x, y, w, h -> the project's exclusive integer boxes.
DOG_A, DOG_B, PERSON = [4, 6, 24, 24], [40, 10, 65, 40], [70, 20, 85, 60]


def test_box_conversion():
    assert xywh_to_box([4.0, 6.0, 20.0, 18.0], 96, 64) == DOG_A
    assert xywh_to_box([40.0, 10.0, 24.5, 30.0], 96, 64) == DOG_B  # a fractional edge is covered
    assert xywh_to_box([10.2, 5.7, 3.1, 2.0], 96, 64) == [10, 5, 14, 8]
    assert xywh_to_box([0, 0, 96, 64], 96, 64) == [0, 0, 96, 64]  # the whole image
    assert xywh_to_box([90.0, 60.0, 8.0, 6.0], 96, 64) == [90, 60, 96, 64]  # mostly inside: clipped
    with pytest.raises(Skip, match="box outside the image"):
        xywh_to_box([500.0, 5.0, 10.0, 10.0], 96, 64)
    with pytest.raises(Skip, match="box outside the image"):
        xywh_to_box([94.0, 0.0, 10.0, 10.0], 96, 64)  # 80% outside
    with pytest.raises(Skip, match="degenerate"):
        xywh_to_box([5.0, 5.0, 0.0, 3.0], 96, 64)


def _rle_string(counts: list[int]) -> str:
    """pycocotools' rleToString, to check the decoder against the documented encoding."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def test_rle_and_polygon_masks():
    h, w = 6, 4
    counts = [3, 2, 7, 5, 7]  # column-major runs of 0s and 1s
    assert _rle_counts_from_string(_rle_string(counts)) == counts
    mask = rle_to_mask({"size": [h, w], "counts": _rle_string(counts)})
    flat = mask.T.reshape(-1)
    assert flat[:3].sum() == 0 and flat[3:5].all() and flat[5:12].sum() == 0 and flat[12:17].all()
    assert (mask == rle_to_mask({"size": [h, w], "counts": counts})).all()
    # A polygon in continuous coordinates covers the pixels whose centres it contains: x 1..3, y 1..4.
    poly = segmentation_mask([[1, 1, 3, 1, 3, 4, 1, 4]], 4, 6)
    assert poly[1:4, 1:3].all() and poly.sum() == 6
    half = segmentation_mask([[0.5, 0, 2.6, 0, 2.6, 1, 0.5, 1]], 4, 6)  # centres 0.5 and 1.5, 2.5 are in
    assert half[0].tolist() == [True, True, True, False] and half.sum() == 3


def _refcoco_inputs(tmp_path, bad=True):
    coco = F.coco_like(tmp_path / "coco", n_images=2)
    table = F.refcoco_table(coco, bad=bad)
    parquet = F.write_parquet(table, tmp_path / "refcoco" / "train-00000-of-00001.parquet")
    instances = tmp_path / "instances_train2014.json"
    instances.write_text(json.dumps(coco))
    return coco, parquet, instances


def test_refcoco_annotation_tables(tmp_path):
    coco, parquet, instances = _refcoco_inputs(tmp_path)
    out = tmp_path / "out"
    summary = refcoco.main(["--input", str(parquet), "--images", str(tmp_path / "coco"), "--output", str(out),
                            "--dataset", "refcoco+", "--coco-instances", str(instances), "--quiet"])
    assert summary.samples == 6
    assert summary.skipped == {"box outside the image": 1, "empty sentence list": 1}
    samples = F.read_samples(out)
    by_ann = {s["json"]["grounding"]["ann_id"]: s for s in samples}
    dog = by_ann[1]["json"]
    assert dog["task"] == "grounding" and dog["dataset"] == "refcoco+" and (dog["width"], dog["height"]) == (96, 64)
    assert dog["prompt"] == "the left dog 0" and dog["grounding"]["expressions"] == ["the left dog 0", "dog on the left"]
    g = dog["grounding"]
    assert g["class"] == "dog" and g["box"] == DOG_A and g["unique"] is True
    assert g["instances"] == [DOG_A, DOG_B] and g["object_index"] == 0
    assert g["polygon"] == [[4.0, 6.0, 24.0, 6.0, 24.0, 24.0, 4.0, 24.0]]
    assert by_ann[2]["json"]["grounding"]["object_index"] == 1  # the second dog is the referred one there
    person = by_ann[3]["json"]["grounding"]
    assert person["class"] == "person" and person["instances"] == [PERSON]
    # Image bytes are the COCO file, copied through.
    name = coco["images"][0]["file_name"]
    assert by_ann[1]["image.jpg"] == (tmp_path / "coco" / "train2014" / name).read_bytes()


def test_refcoco_without_instances_json_lists_the_referred_object(tmp_path):
    _, parquet, _ = _refcoco_inputs(tmp_path, bad=False)
    out = tmp_path / "out"
    refcoco.main(["--input", str(parquet), "--images", str(tmp_path / "coco"), "--output", str(out), "--quiet"])
    g = F.read_samples(out)[0]["json"]["grounding"]
    assert g["instances"] == [g["box"]] and g["class"] == "dog"


def test_refcoco_missing_images_are_counted(tmp_path):
    _, parquet, _ = _refcoco_inputs(tmp_path, bad=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    summary = refcoco.main(["--input", str(parquet), "--images", str(empty), "--output", str(tmp_path / "o"),
                            "--quiet"])
    assert summary.samples == 0 and summary.skipped == {"image file not found": 6}


def test_refcoco_eval_tables(tmp_path):
    parquet = F.write_parquet(F.refcoco_eval_table(3, bad=True), tmp_path / "RefCOCO" / "val-00000-of-00001.parquet")
    out = tmp_path / "out"
    summary = refcoco.main(["--input", str(parquet), "--output", str(out), "--quiet"])
    assert summary.samples == 3
    assert summary.skipped == {"missing image bytes": 1, "box outside the image": 1}
    for i, s in enumerate(F.read_samples(out)):
        rec = s["json"]
        assert rec["grounding"]["box"] == [8 + i, 10, 38 + i, 30]
        assert rec["prompt"] == f"the box {i}" and rec["grounding"]["question_id"] == f"q{i}"
        assert rec["eval"] == {"benchmark": "refcoco", "split": "val", "has_target": False}
        assert F.decode(s["image.jpg"]).shape == (64, 96, 3)


def test_lvis(tmp_path):
    data = F.add_bad_annotations(F.coco_like(tmp_path / "coco", n_images=3, folder="train2017",
                                             file_pattern="{:012d}.jpg", lvis=True))
    ann = tmp_path / "lvis_v1_train.json"
    ann.write_text(json.dumps(data))
    out = tmp_path / "out"
    summary = lvis.main(["--input", str(ann), "--images", str(tmp_path / "coco"), "--output", str(out), "--quiet"])
    assert summary.samples == 6  # 3 images x (dog, person)
    assert summary.skipped == {"instance dropped: box outside the image": 1}
    recs = [s["json"] for s in F.read_samples(out)]
    dogs = [r for r in recs if r["grounding"]["class"] == "dog"]
    assert len(dogs) == 3
    g = dogs[0]["grounding"]
    assert g["instances"] == [DOG_A, DOG_B] and g["object_index"] == 1 and g["box"] == DOG_B  # the largest
    assert g["unique"] is False and g["expressions"] == ["the dog", "the dogs"] and g["class_plural"] == "dogs"
    person = next(r for r in recs if r["grounding"]["class"] == "person")["grounding"]
    assert person["instances"] == [PERSON] and person["unique"] is True  # the outside box was dropped
    assert all(r["prompt"] == r["grounding"]["expression"] for r in recs)


def test_missing_inputs_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        lvis.main(["--input", str(tmp_path / "nope.json"), "--images", str(tmp_path), "--output", str(tmp_path / "o")])
    assert capsys.readouterr().err.strip() == f"error: input path not found: {tmp_path / 'nope.json'}"


def _refer_release(tmp_path, refs_names=("refs(unc).p",)):
    """The original release as the `refer` toolkit unpacks it: refcoco/refs(unc).p (a protocol-2 pickle of refs,
    as Python 2 wrote it) + refcoco/instances.json, with the COCO train2014 images elsewhere."""
    import pickle

    coco = F.coco_like(tmp_path / "coco", n_images=2)
    folder = tmp_path / "refer" / "refcoco"
    folder.mkdir(parents=True)
    (folder / "instances.json").write_text(json.dumps(coco))
    names = {c["id"]: c["name"] for c in coco["categories"]}
    refs = []
    for k, ann in enumerate(a for a in coco["annotations"] if not a.get("iscrowd")):
        name = coco["images"][0 if ann["image_id"] == 100 else 1]["file_name"]
        text = f"{names[ann['category_id']]} number {k}"
        refs.append({"sent_ids": [k], "file_name": name.replace(".jpg", f"_{ann['id']}.jpg"), "ann_id": ann["id"],
                     "ref_id": k, "image_id": ann["image_id"], "split": "testA" if k == 5 else "train",
                     "sentences": [{"tokens": text.split(), "raw": text.upper(), "sent_id": k, "sent": text}],
                     "category_id": ann["category_id"]})
    for i, refs_name in enumerate(refs_names):
        (folder / refs_name).write_bytes(pickle.dumps(refs[i:], protocol=2))
    return coco, folder


def test_refcoco_original_release_layout(tmp_path):
    coco, folder = _refer_release(tmp_path)
    out = tmp_path / "out"
    summary = refcoco.main(["--input", str(folder), "--images", str(tmp_path / "coco" / "train2014"),
                            "--output", str(out), "--split", "train", "--quiet"])
    assert summary.samples == 5 and summary.skipped == {"split not selected": 1}  # today: "no .parquet files"
    recs = [s["json"]["grounding"] for s in F.read_samples(out)]
    assert [g["expression"] for g in recs] == [f"{c} number {k}" for k, c in enumerate(["dog", "dog", "person",
                                                                                          "dog", "dog"])]
    assert recs[0]["box"] == DOG_A and recs[0]["instances"] == [DOG_A, DOG_B]  # every instance, from instances.json
    assert recs[1]["object_index"] == 1 and recs[2]["class"] == "person" and recs[2]["instances"] == [PERSON]
    assert recs[0]["ref_id"] == 0 and recs[0]["ann_id"] == 1 and recs[0]["image_id"] == 100
    assert recs[0]["polygon"] == [[4.0, 6.0, 24.0, 6.0, 24.0, 24.0, 4.0, 24.0]]
    sample = F.read_samples(out)[0]
    assert sample["image.jpg"] == (tmp_path / "coco" / "train2014" / coco["images"][0]["file_name"]).read_bytes()
    # the refs file itself is an input too
    again = refcoco.main(["--input", str(folder / "refs(unc).p"), "--images", str(tmp_path / "coco"),
                          "--output", str(tmp_path / "again"), "--quiet"])
    assert again.samples == 6


def test_refcoco_original_release_picks_its_refs_file(tmp_path, capsys):
    _, folder = _refer_release(tmp_path, refs_names=("refs(umd).p", "refs(google).p"))
    images = str(tmp_path / "coco" / "train2014")
    umd = refcoco.main(["--input", str(folder), "--images", images, "--dataset", "refcocog",
                        "--output", str(tmp_path / "umd"), "--quiet"])
    google = refcoco.main(["--input", str(folder), "--images", images, "--dataset", "refcocog", "--split-by",
                           "google", "--output", str(tmp_path / "google"), "--quiet"])
    assert (umd.samples, google.samples) == (6, 5)  # refcocog reads umd by default
    with pytest.raises(SystemExit):
        refcoco.main(["--input", str(folder), "--images", images, "--output", str(tmp_path / "x"), "--quiet"])
    assert "pick one with --split-by" in capsys.readouterr().err


def test_lvis_expressions_drop_the_disambiguator(tmp_path):
    data = F.coco_like(tmp_path / "coco", n_images=1, folder="train2017", file_pattern="{:012d}.jpg", lvis=True)
    for c in data["categories"]:
        if c["name"] == "dog":
            c["name"], c["synonyms"] = "bow_(weapon)", ["bow_(weapon)", "longbow"]
    ann = tmp_path / "lvis_v1_train.json"
    ann.write_text(json.dumps(data))
    lvis.main(["--input", str(ann), "--images", str(tmp_path / "coco"), "--output", str(tmp_path / "out"), "--quiet"])
    g = next(s["json"]["grounding"] for s in F.read_samples(tmp_path / "out") if s["json"]["grounding"]["class"] != "person")
    assert g["expressions"] == ["the bow", "the longbow"] and g["class"] == "bow"  # today: "the bow (weapon)"
    assert g["class_plural"] == "bows"
