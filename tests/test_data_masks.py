"""Inpainting masks: the paper's proportions, the IoU rule of random masks, closed irregular masks."""

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import webdataset as wds

from cologen.data.builders import BuilderConfig, TaskBuilder
from cologen.data.masks import iou, irregular_mask, random_mask
from cologen.data.records import BadSample, decode_sample


@pytest.fixture(scope="module")
def scenes(shapeworld_dir):
    urls = sorted(str(p) for p in (Path(shapeworld_dir) / "inpainting").glob("train-*.tar"))
    return [decode_sample(r) for r in wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None)]


@pytest.fixture(scope="module")
def draws(scenes):
    builder, rng = TaskBuilder(), np.random.default_rng(0)
    return [(s, builder(s, "inpainting", rng)) for s in (scenes[i % len(scenes)] for i in range(2000))]


def test_mask_kind_proportions_over_2000_draws(draws):
    counts = Counter(ex["meta"]["build"]["mask_kind"] for _, ex in draws)
    for kind, weight in {"random": 0.2, "object": 0.4, "irregular": 0.4}.items():
        assert abs(counts[kind] / 2000 - weight) <= 0.02, counts


def test_source_is_the_image_greyed_inside_the_mask(draws):
    for _, ex in draws[:200]:
        m = ex["region"].astype(bool)
        assert m.any() and (ex["source"][m] == 128).all()
        assert (ex["source"][~m] == ex["target"][~m]).all()


def test_no_random_mask_is_kept_with_iou_above_threshold(draws):
    n = 0
    for s, ex in draws:
        if ex["meta"]["build"]["mask_kind"] != "random":
            continue
        n += 1
        for i in range(len(s.record["objects"])):
            assert iou(ex["region"], s.instances == i + 1) <= 0.3
    assert n >= 380


def test_random_mask_in_a_crowded_scene_still_obeys_the_rule():
    rng = np.random.default_rng(1)
    big = np.zeros((32, 32), np.uint8)
    big[2:30, 2:30] = 1  # one object covering most of the image
    for _ in range(200):
        m, _ = random_mask(rng, 32, 32, [big], max_iou=0.3)
        assert iou(m, big) <= 0.3
    with pytest.raises(BadSample, match="no random mask"):
        random_mask(rng, 32, 32, [np.ones((32, 32), np.uint8)], max_iou=0.0, tries=5)


def test_irregular_masks_are_closed_and_inside_the_image(draws):
    seen = 0
    for s, ex in draws:
        build = ex["meta"]["build"]
        if build["mask_kind"] != "irregular":
            continue
        seen += 1
        pts = np.array(build["points"])
        assert pts.shape == (20, 2)
        assert (pts >= 0).all() and (pts[:, 0] <= 32).all() and (pts[:, 1] <= 32).all()
        contours, hierarchy = cv2.findContours(ex["region"].copy(), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
        assert len(contours) == 1 and hierarchy[0][0][3] == -1  # one filled region, no hole
        obj = s.instances == build["object_index"] + 1
        assert (ex["region"][obj] > 0).mean() > 0.5  # it is fitted to the object's box
    assert seen >= 780


def test_irregular_mask_of_a_box_at_the_border_is_clipped():
    m, pts = irregular_mask(np.random.default_rng(0), [24, 24, 32, 32], 32, 32, n_points=20)
    assert m.any() and m.shape == (32, 32) and pts.max() <= 32


def test_object_masks_cover_their_object(draws):
    for s, ex in draws:
        build = ex["meta"]["build"]
        if build["mask_kind"] == "object":
            obj = s.instances == build["object_index"] + 1
            assert (ex["region"][obj] == 1).all()


def test_proportions_are_configurable(scenes):
    builder = TaskBuilder(BuilderConfig(mask_kinds={"random": 1.0}))
    rng = np.random.default_rng(0)
    assert {builder(scenes[i], "inpainting", rng)["meta"]["build"]["mask_kind"] for i in range(20)} == {"random"}
    with pytest.raises(ValueError, match="builder.mask_kinds: unknown"):
        BuilderConfig(mask_kinds={"blob": 1.0}).validate()


def _without_objects(s):
    """The scene as a text-to-image shard stores it: image and caption, no objects, no instance map."""
    from dataclasses import replace

    return replace(s, record={k: v for k, v in s.record.items() if k != "objects"}, instances=None)


def test_samples_without_objects_get_random_masks_and_the_rest_keep_the_proportions(scenes):
    builder, rng = TaskBuilder(), np.random.default_rng(1)
    samples = [_without_objects(s) if i % 10 < 3 else s for i, s in enumerate(scenes[i % len(scenes)]
                                                                           for i in range(2000))]
    examples = [builder(s, "inpainting", rng) for s in samples]  # none raises: nothing is skipped
    bare = [ex["meta"]["build"] for s, ex in zip(samples, examples) if s.instances is None]
    assert len(bare) == 600 and all(b["mask_kind"] == "random" and b["mask_fallback"] == "no objects" for b in bare)
    assert all(ex["region"].any() for ex in examples)
    counts = Counter(ex["meta"]["build"]["mask_kind"] for s, ex in zip(samples, examples) if s.instances is not None)
    for kind, weight in {"random": 0.2, "object": 0.4, "irregular": 0.4}.items():
        assert abs(counts[kind] / 1400 - weight) <= 0.02, counts


def test_kinds_dealt_by_stream_index_are_exact_and_independent_of_order(scenes):
    """The training stream passes each sample's slot: the kind is a function of the slot alone."""
    builder = TaskBuilder(deal_seed=7)
    kinds = [builder(scenes[i % len(scenes)], "inpainting", np.random.default_rng(i), index=i)["meta"]["build"]
             ["mask_kind"] for i in range(1000)]
    assert Counter(kinds) == {"random": 200, "object": 400, "irregular": 400}
    again = TaskBuilder(deal_seed=7)
    for i in (999, 3, 512):
        assert again(scenes[i % len(scenes)], "inpainting", np.random.default_rng(i), index=i)["meta"]["build"][
            "mask_kind"] == kinds[i]
