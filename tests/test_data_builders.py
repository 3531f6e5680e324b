"""Task builders: the batch contract, grounding overlays, control maps, subject pairs, resizing, annotators."""

import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import webdataset as wds

from cologen.data.annotators import HEDNet, LineartNet
from cologen.data.builders import BuilderConfig, TaskBuilder
from cologen.data.collate import collate
from cologen.data.geometry import make_buckets
from cologen.data.records import decode_sample
from cologen.data.tasks import TASKS, check_task


def _load(root, task, n=None):
    urls = sorted(str(p) for p in (Path(root) / task).glob("train-*.tar"))
    out = [decode_sample(r) for r in wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None)]
    return out[:n] if n else out


def _build(samples, task, builder=None, seed=0):
    builder, rng = builder or TaskBuilder(), np.random.default_rng(seed)
    return [builder(s, task, rng) for s in samples]


def test_task_names_in_one_place():
    # a task's index seeds its data streams: new tasks come last, so the others keep their streams
    assert TASKS == ("inpainting", "grounding", "control", "customized", "editing", "t2i", "reconstruct",
                     "customized_layout", "two_subjects")
    with pytest.raises(ValueError, match="unknown task 'inpaint'"):
        check_task("inpaint")


@pytest.mark.parametrize("task,source", [("inpainting", "inpainting"), ("grounding", "grounding"),
                                         ("control", "control"), ("customized", "customized"),
                                         ("editing", "editing"), ("t2i", "inpainting"), ("reconstruct", "control")])
def test_batch_contract(shapeworld_dir, task, source):
    batch = collate(_build(_load(shapeworld_dir, source, 8), task))
    assert set(batch) == {"target", "source", "has_source", "prompt", "task", "key", "region", "meta"}
    for name in ("target", "source"):
        assert batch[name].shape == (8, 3, 32, 32) and batch[name].dtype == torch.float32
        assert batch[name].min() >= -1 and batch[name].max() <= 1
    assert batch["region"].shape == (8, 1, 32, 32) and set(batch["region"].unique().tolist()) <= {0.0, 1.0}
    assert batch["has_source"].dtype == torch.bool and batch["has_source"].all() == (task != "t2i")
    if task == "t2i":
        assert (batch["source"] == 0).all() and (batch["region"] == 0).all()
    if task == "reconstruct":
        assert torch.equal(batch["source"], batch["target"])
    if task in ("inpainting", "grounding", "editing", "customized"):
        assert (batch["region"].flatten(1).sum(1) > 0).all()
    assert batch["task"] == [task] * 8 and all(isinstance(p, str) and p for p in batch["prompt"])
    assert all(m["record"]["task"] == source for m in batch["meta"])
    assert all(k.startswith(f"sw-{source}-") for k in batch["key"])


def test_grounding_overlays_are_drawn_as_prompted(shapeworld_dir):
    samples = _load(shapeworld_dir, "grounding") * 5  # 600 draws: six exact blocks of 100
    examples = _build(samples, "grounding")
    kinds = Counter(ex["meta"]["build"]["overlay"] for ex in examples)
    assert all(abs(kinds[k] - 200) <= 1 for k in ("box", "mask", "class_boxes")), kinds
    for s, ex in zip(samples, examples):
        b = ex["meta"]["build"]
        rgb = np.array(b["rgb"], np.uint8)
        assert b["color"] in ex["prompt"] and ex["prompt"].count(" ") >= 3
        assert (ex["source"] == s.image).all()
        painted = (ex["target"] == rgb).all(-1)
        changed = (ex["target"] != ex["source"]).any(-1)
        assert painted[changed].all()  # every changed pixel has the overlay colour
        obj = s.instances == b["object_index"] + 1
        if b["overlay"] == "box":
            assert b["expression"] in ex["prompt"]
            x0, y0, x1, y1 = b["box"]
            assert painted[y0, x0:x1].all() and painted[y1 - 1, x0:x1].all()
            assert painted[y0:y1, x0].all() and painted[y0:y1, x1 - 1].all()
            assert (ex["region"] == obj).all()
        elif b["overlay"] == "mask":
            assert b["expression"] in ex["prompt"]
            assert painted[obj].all() and (ex["region"] == obj).all()
        else:
            g = s.record["grounding"]
            assert g["class"] in ex["prompt"] and b["boxes"] == g["instances"]
            union = np.isin(s.instances, [i + 1 for i in g["instance_indices"]])
            assert (ex["region"] == union).all()


def test_overlay_colours_are_not_object_colours(shapeworld_dir):
    from data_recipes.shapeworld import COLORS

    cfg = BuilderConfig()
    assert not {tuple(v) for v in cfg.overlay_colors.values()} & set(COLORS.values())


def test_control_types_and_maps(shapeworld_dir):
    samples = _load(shapeworld_dir, "control") * 5
    examples = _build(samples, "control")
    counts = Counter(ex["meta"]["build"]["control_type"] for ex in examples)
    assert all(abs(counts[k] - 200) <= 1 for k in ("depth", "seg", "canny")), counts
    for s, ex in zip(samples, examples):
        kind = ex["meta"]["build"]["control_type"]
        expected = {"depth": np.repeat(s.depth[..., None], 3, 2), "seg": s.seg,
                    "canny": np.repeat(cv2.Canny(s.image, 100, 200)[..., None], 3, 2)}[kind]
        assert (ex["source"] == expected).all() and ex["prompt"] == s.record["caption"]


def test_annotated_control_types_need_weights(tmp_path, shapeworld_dir):
    with pytest.raises(ValueError, match=r"builder\.annotator_weights\.hed"):
        BuilderConfig(control_types={"hed": 1.0}).validate()
    with pytest.raises(ValueError, match="unknown control type 'sketch'"):
        BuilderConfig(control_types={"sketch": 1.0}).validate()
    # checkpoints in the ControlNet annotator layout load and run (random weights here)
    torch.save(HEDNet().state_dict(), tmp_path / "ControlNetHED.pth")
    torch.save(LineartNet().state_dict(), tmp_path / "sk_model.pth")
    cfg = BuilderConfig(control_types={"hed": 1.0, "lineart": 1.0},
                        annotator_weights={"hed": str(tmp_path / "ControlNetHED.pth"),
                                           "lineart": str(tmp_path / "sk_model.pth")})
    examples = _build(_load(shapeworld_dir, "control", 4), "control", TaskBuilder(cfg))
    assert {ex["meta"]["build"]["control_type"] for ex in examples} == {"hed", "lineart"}
    assert all(ex["source"].shape == (32, 32, 3) and ex["source"].dtype == np.uint8 for ex in examples)
    missing = BuilderConfig(control_types={"hed": 1.0}, annotator_weights={"hed": str(tmp_path / "nope.pth")})
    with pytest.raises(FileNotFoundError, match="builder.annotator_weights.hed"):
        _build(_load(shapeworld_dir, "control", 1), "control", TaskBuilder(missing))


def test_customized_pairs_are_used_both_ways(shapeworld_dir):
    samples = _load(shapeworld_dir, "customized")
    examples = _build(samples, "customized")
    swapped = [ex["meta"]["build"]["swapped"] for ex in examples]
    assert 0.3 < np.mean(swapped) < 0.7
    for s, ex in zip(samples, examples):
        sub = s.record["subject"]
        if ex["meta"]["build"]["swapped"]:
            assert (ex["target"] == s.source).all() and (ex["source"] == s.image).all()
            assert ex["prompt"] == sub["source_description"] and (ex["region"] == (s.source_mask > 0)).all()
        else:
            assert (ex["target"] == s.image).all() and ex["prompt"] == sub["target_description"]
        assert ex["meta"]["build"]["subject_id"] == sub["id"]


def test_editing_keeps_the_instruction_and_region(shapeworld_dir):
    samples = _load(shapeworld_dir, "editing", 20)
    for s, ex in zip(samples, _build(samples, "editing")):
        assert ex["prompt"] == s.record["edit"]["instruction"]
        assert (ex["source"] == s.source).all() and (ex["region"] == (s.mask > 0)).all()


def test_a_record_of_another_task_is_refused(shapeworld_dir):
    from cologen.data.records import BadSample

    with pytest.raises(BadSample, match="in the 'grounding' stream"):
        _build(_load(shapeworld_dir, "editing", 1), "grounding")


def _big_sample(w=64, h=48):
    img = np.full((h, w, 3), 100, np.uint8)
    img[10:30, 20:40] = (220, 40, 40)
    inst = np.zeros((h, w), np.uint8)
    inst[10:30, 20:40] = 1
    rec = {"task": "grounding", "prompt": "the red square", "caption": "a red square", "width": w, "height": h,
           "objects": [{"class": "square", "color": "red", "box": [20, 10, 40, 30]}],
           "grounding": {"expression": "the red square", "class": "square", "box": [20, 10, 40, 30],
                         "instances": [[20, 10, 40, 30]], "object_index": 0}}
    raw = {"__key__": "big", "json": json.dumps(rec).encode(), "image.png": cv2.imencode(".png", img)[1].tobytes(),
           "instances.png": cv2.imencode(".png", inst)[1].tobytes()}
    return decode_sample(raw)


def test_resize_and_crop_maps_boxes_into_the_output_frame():
    s = _big_sample()
    ex = TaskBuilder(BuilderConfig(overlay_kinds={"box": 1.0}), resolution=32)(s, "grounding", np.random.default_rng(0))
    assert ex["target"].shape == (32, 32, 3)
    # 64x48 -> scale 2/3 -> 43x32 -> centre crop at x = 5: box [20,10,40,30] -> [8.3,6.7,21.7,20] -> outward
    assert ex["meta"]["build"]["box"] == [8, 6, 22, 20]
    assert ex["meta"]["frame"]["offset"] == [5, 0]
    ys, xs = np.nonzero(ex["region"])
    region_box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert all(abs(a - b) <= 1 for a, b in zip(region_box, [8, 6, 22, 20]))
    # a box cut by the crop is clipped to the output frame
    s.record["grounding"]["box"] = [40, 10, 60, 30]
    ex = TaskBuilder(BuilderConfig(overlay_kinds={"box": 1.0}), resolution=32)(s, "grounding", np.random.default_rng(0))
    assert ex["meta"]["build"]["box"] == [21, 6, 32, 20]


def test_aspect_ratio_buckets():
    buckets = make_buckets(64, multiple=16)
    assert (64, 64) in buckets and all(w % 16 == 0 and h % 16 == 0 for w, h in buckets)
    assert all((h, w) in buckets for w, h in buckets)
    ex = TaskBuilder(resolution=64, buckets=buckets)(_big_sample(128, 64), "t2i", np.random.default_rng(0))
    h, w = ex["target"].shape[:2]
    assert w > h and abs(w / h - 2.0) < 0.5


def test_prompt_templates_are_configurable(shapeworld_dir):
    cfg = BuilderConfig(prompt_templates={"inpainting": ["fill in: {caption}"]})
    ex = _build(_load(shapeworld_dir, "inpainting", 1), "inpainting", TaskBuilder(cfg))[0]
    assert ex["prompt"].startswith("fill in: a ")
    with pytest.raises(ValueError, match="unknown key 'paint'"):
        BuilderConfig(prompt_templates={"paint": ["x"]}).validate()


def test_bucketed_batches_share_a_size_in_training_and_validation(tmp_path):
    from cologen.data.datamodule import MixtureDataModule

    with wds.TarWriter(str(tmp_path / "mixed.tar"), encoder=False, mtime=0) as sink:
        for i in range(24):
            w, h = [(64, 32), (32, 64), (48, 48)][i % 3]
            img = np.full((h, w, 3), 40 * (i % 5), np.uint8)
            rec = {"task": "inpainting", "prompt": f"scene {i}", "width": w, "height": h, "objects": []}
            sink.write({"__key__": f"s{i:03d}", "json": json.dumps(rec).encode(),
                        "image.png": cv2.imencode(".png", img)[1].tobytes()})
    shards = {"inpainting": str(tmp_path / "mixed.tar")}
    dm = MixtureDataModule(shards, {"t2i": 1.0}, shards, batch_size=4, num_workers=0, resolution=32,
                           aspect_buckets=True, bucket_multiple=8, batches_per_epoch=12, val_tasks=["t2i"])
    train_shapes = [tuple(b["target"].shape[2:]) for b in dm.train_dataloader()]
    val_shapes = [tuple(b["target"].shape[2:]) for ld in dm.val_dataloader() for b in ld]
    for shapes in (train_shapes, val_shapes):
        assert set(shapes) == {(24, 48), (48, 24), (32, 32)}  # (H, W) buckets of ~32^2 pixels
    assert sum(len(b["key"]) for ld in dm.val_dataloader() for b in ld) == 24


def _polygon_sample(w=32, h=32):
    """A grounding record with polygons and no instances.png (as RefCOCO converts): the mask comes from them."""
    img = np.full((h, w, 3), 90, np.uint8)
    rect, tri = [4, 6, 14, 6, 14, 17, 4, 17], [18.3, 5.2, 29.6, 5.2, 23.9, 26.8]
    rec = {"task": "grounding", "prompt": "the square", "width": w, "height": h,
           "objects": [{"class": "square", "box": [4, 6, 14, 17], "polygon": [rect]},
                       {"class": "triangle", "box": [18, 5, 30, 27], "polygon": [tri]}],
           "grounding": {"expression": "the square", "class": "square", "box": [4, 6, 14, 17],
                         "polygon": [rect], "object_index": 0}}
    raw = {"__key__": "poly", "json": json.dumps(rec).encode(), "image.png": cv2.imencode(".png", img)[1].tobytes()}
    return decode_sample(raw)


@pytest.mark.parametrize("resolution", [32, 48])
def test_mask_overlay_from_polygons_stays_inside_the_box(resolution):
    """Pixels are filled when their centre is inside the polygon, so a mask overlay never paints past the
    record's exclusive box (cv2.fillPoly painted one more row and column)."""
    s = _polygon_sample()
    builder = TaskBuilder(BuilderConfig(overlay_kinds={"mask": 1.0}), resolution=resolution)
    for index, box in ((0, [4, 6, 14, 17]), (1, [18, 5, 30, 27])):
        g = s.record["grounding"]
        g.update(object_index=index, box=box, polygon=s.record["objects"][index]["polygon"])
        ex = builder(s, "grounding", np.random.default_rng(0))
        painted = (ex["target"] != ex["source"]).any(-1)
        ys, xs = np.nonzero(painted)
        x0, y0, x1, y1 = ex["meta"]["build"]["box"]
        assert painted.any() and xs.min() >= x0 and ys.min() >= y0 and xs.max() < x1 and ys.max() < y1
        if index == 0 and resolution == 32:  # an axis-aligned rectangle fills its box exactly
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == box and painted.sum() == 10 * 11


def test_control_types_are_drawn_among_those_the_sample_supports(shapeworld_dir):
    from dataclasses import replace

    from cologen.data.records import BadSample

    samples = _load(shapeworld_dir, "control") * 5
    no_seg = [replace(s, seg=None) for s in samples]
    examples = _build(no_seg, "control")  # depth, seg, canny configured: seg is never dealt, none skipped
    counts = Counter(ex["meta"]["build"]["control_type"] for ex in examples)
    assert set(counts) == {"depth", "canny"} and all(abs(counts[k] - 300) <= 1 for k in counts), counts
    bare = [replace(s, seg=None, depth=None) for s in samples[:20]]
    assert {ex["meta"]["build"]["control_type"] for ex in _build(bare, "control")} == {"canny"}
    stored_only = TaskBuilder(BuilderConfig(control_types={"depth": 1.0, "seg": 2.0}))
    with pytest.raises(BadSample, match=r"none of the control types \['depth', 'seg'\] fits this sample: "
                                        r"depth needs depth.png and seg needs seg.png") as e:
        stored_only(bare[0], "control", np.random.default_rng(0))
    assert e.value.category == "missing"
