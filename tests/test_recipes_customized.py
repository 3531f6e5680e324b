"""Customized-generation recipes: Subjects200K (composite split into two 512 crops, both directions) and
the DreamBench benchmark folder."""

from __future__ import annotations

import numpy as np
import pytest

from cologen.testing import recipe_fixtures as F
from data_recipes import dreambench, subjects200k


def _convert(tmp_path, table, *extra):
    parquet = F.write_parquet(table, tmp_path / "in" / "train-00000-of-00001.parquet")
    out = tmp_path / "out"
    return subjects200k.main(["--input", str(parquet), "--output", str(out), "--quiet", *extra]), F.read_samples(out)


def test_subjects200k_crops_both_directions(tmp_path):
    summary, samples = _convert(tmp_path, F.subjects200k_table(3, bad=True))
    assert summary.samples == 6 and summary.rows_read == 7
    assert summary.skipped == {"missing image bytes": 1, "no quality assessment": 1, "quality < 5": 1,
                               "composite is not two square views side by side": 1}
    left_to_right, right_to_left = samples[0], samples[1]
    for s in samples:
        rec = s["json"]
        assert rec["task"] == "customized" and (rec["width"], rec["height"]) == (512, 512)
        assert rec["prompt"] == rec["subject"]["target_description"] == rec["caption"]
        assert rec["quality"] == {"compositeStructure": 5, "objectConsistency": 5, "imageQuality": 5}
    # Sample _0: target = left half (its red box at 100..300), source = right half (blue box at 200..400).
    target, source = F.decode(left_to_right["image.jpg"]), F.decode(left_to_right["source.jpg"])
    assert target.shape == source.shape == (512, 512, 3)
    assert np.abs(target[200, 200].astype(int) - (230, 30, 30)).max() < 12
    assert np.abs(source[250, 300].astype(int) - (30, 30, 230)).max() < 12
    assert np.abs(target[50, 50].astype(int) - source[50, 50].astype(int)).max() > 0  # not the margin
    assert left_to_right["json"]["prompt"] == "left scene 0"
    assert left_to_right["json"]["subject"]["source_description"] == "right scene 0"
    # Sample _1 is the other direction of the same pair.
    assert right_to_left["image.jpg"] == left_to_right["source.jpg"]
    assert right_to_left["source.jpg"] == left_to_right["image.jpg"]
    assert right_to_left["json"]["prompt"] == "right scene 0"
    assert left_to_right["json"]["subject"]["id"] == right_to_left["json"]["subject"]["id"]


def test_subjects200k_unscored_rows_and_png_crops(tmp_path):
    table = F.subjects200k_table(2, bad=True)
    summary, samples = _convert(tmp_path, table, "--min-quality", "0", "--crop-format", "png")
    # With --min-quality 0 the null-quality and the low-quality rows are kept too.
    assert summary.samples == 8
    assert summary.skipped == {"missing image bytes": 1, "composite is not two square views side by side": 1}
    assert sum("quality" not in s["json"] for s in samples) == 2  # the null-quality row, both directions
    assert all("image.png" in s and "source.png" in s for s in samples)
    # PNG crops are lossless: exactly the composite's pixels at the documented boxes.
    composite = F.decode(table.column("image")[0].as_py()["bytes"])
    assert (F.decode(samples[0]["image.png"]) == composite[8:520, 8:520]).all()
    assert (F.decode(samples[0]["source.png"]) == composite[8:520, 528:1040]).all()


def test_subjects200k_collections(tmp_path):
    summary, samples = _convert(tmp_path, F.subjects200k_table(4), "--collections", "collection_2")
    assert summary.skipped == {"collection not selected": 2} and summary.samples == 4
    assert all(s["json"]["subject"]["collection"] == "collection_2" for s in samples)


def test_dreambench(tmp_path):
    folder = F.dreambench_folder(tmp_path)
    out = tmp_path / "out"
    summary = dreambench.main(["--input", str(folder), "--output", str(out), "--quiet", "--unique-token", "sks"])
    assert summary.samples == 9  # 3 subjects x 3 prompts
    samples = F.read_samples(out)
    recs = [s["json"] for s in samples]
    assert [r["subject"]["id"] for r in recs[:3]] == ["backpack"] * 3
    dog = [r for r in recs if r["subject"]["id"] == "dog"]
    assert dog[1]["prompt"] == "a sks dog wearing a red hat" and dog[1]["eval"]["clip_prompt"] == "a dog wearing a red hat"
    assert dog[0]["subject"]["live"] is True and recs[0]["subject"]["live"] is False
    assert recs[0]["prompt"] == "a sks backpack in the jungle" and recs[2]["prompt"] == "a cube shaped sks backpack"
    assert all(r["task"] == "customized" and r["eval"]["has_target"] is False for r in recs)
    assert samples[0]["source.jpg"] == (folder / "backpack" / "00.jpg").read_bytes() == samples[0]["image.jpg"]
    assert (recs[0]["width"], recs[0]["height"]) == (80, 64)


def test_dreambench_needs_its_prompt_file(tmp_path):
    (tmp_path / "dataset").mkdir()
    with pytest.raises(SystemExit):
        dreambench.main(["--input", str(tmp_path / "dataset"), "--output", str(tmp_path / "o")])


@pytest.mark.parametrize("size,padding,side", [((2080, 1040), 8, 1024), ((2048, 1024), 0, 1024),
                                               ((1056, 528), 8, 512)])
def test_subjects200k_every_collection_layout(tmp_path, size, padding, side):
    """Collection 3's 1024-pixel views (with the other collections' 8 px padding, or none) convert exactly."""
    import pyarrow as pa
    from PIL import Image

    w, h = size
    composite = Image.new("RGB", size, (128, 128, 128))
    composite.paste(F.draw_image(side, side, 1, [(50, 60, 300, 400)], color=(230, 30, 30)), (padding, padding))
    composite.paste(F.draw_image(side, side, 2, [(200, 100, 450, 480)], color=(30, 30, 230)),
                    (side + 2 * padding, padding))
    schema = F.SUBJECTS_SCHEMA.append(pa.field("raw_json", pa.string()))  # collection 3's extra column
    row = {"image": F.image_cell(F.encode(composite, "png")), "collection": "collection_3",
           "quality_assessment": {"compositeStructure": 5, "objectConsistency": 5, "imageQuality": 5},
           "description": {"item": "a mug", "description_0": "the mug on a desk", "description_1": "the mug outside",
                           "category": "Kitchen", "description_valid": True}, "raw_json": "{}"}
    summary, samples = _convert(tmp_path, pa.Table.from_pylist([row], schema=schema), "--crop-format", "png")
    assert summary.samples == 2 and not summary.skipped  # today: skipped, "composite is not 1056 x 528"
    rec = samples[0]["json"]
    assert (rec["width"], rec["height"]) == (side, side) and rec["subject"]["collection"] == "collection_3"
    pixels = np.asarray(composite)
    left = pixels[padding:padding + side, padding:padding + side]
    right = pixels[padding:padding + side, side + 2 * padding:2 * side + 2 * padding]
    assert (F.decode(samples[0]["image.png"]) == left).all() and (F.decode(samples[0]["source.png"]) == right).all()
