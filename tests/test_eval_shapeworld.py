"""The ShapeWorld runner over a mixed set of built examples: a generator that returns the target
scores perfect on every task, a blank generator clearly worse."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from cologen.eval.loop import run_protocol
from cologen.eval.shapeworld import ShapeWorldScorer, score_sample
from cologen.metrics.edges import canny_edges
from cologen.metrics.pixel import PSNR_CAP_DB

BG = (235, 235, 235)
RED, BLUE, YELLOW = (220, 40, 40), (40, 40, 220), (240, 220, 30)


def base_scene() -> np.ndarray:
    img = np.full((48, 48, 3), BG, np.uint8)
    img[6:18, 6:18] = RED
    cv2.circle(img, (32, 32), 8, BLUE, -1)
    return img


def examples() -> list[dict]:
    scene = base_scene()
    hole = np.zeros((48, 48), np.uint8)
    hole[4:20, 4:20] = 255
    inpaint_source = scene.copy()
    inpaint_source[hole > 0] = 128

    box = [22, 22, 43, 43]
    grounded = scene.copy()
    cv2.rectangle(grounded, (box[0], box[1]), (box[2] - 1, box[3] - 1), YELLOW, 1)

    edited = scene.copy()
    edited[6:18, 6:18] = BLUE
    region = np.zeros((48, 48), np.uint8)
    region[6:18, 6:18] = 255

    reference = np.full((32, 32, 3), BG, np.uint8)
    reference[10:22, 10:22] = RED
    return [
        {"key": "inp", "task": "inpainting", "source": inpaint_source, "image": scene, "mask": hole,
         "object_rgbs": [RED, BLUE]},
        {
            "key": "gro",
            "task": "grounding",
            "source": scene,
            "image": grounded,
            "overlay_rgb": YELLOW,
            "box": box,
        },
        {
            "key": "con",
            "task": "control",
            "source": canny_edges(scene).astype(np.uint8) * 255,
            "image": scene,
        },
        {
            "key": "cus",
            "task": "customized",
            "source": reference,
            "image": scene,
            "subject_mask": [10, 10, 22, 22],
            "named_colors": [RED, BLUE],
            "named_shapes": ["square", "circle"],
        },
        {"key": "edi", "task": "editing", "source": scene, "image": edited, "mask": region},
    ]


def test_target_scores_perfect_on_every_task(tmp_path: Path) -> None:
    out = run_protocol(examples(), lambda s: s["image"], ShapeWorldScorer(), batch_size=2, jsonl_path=tmp_path / "sw.jsonl")
    assert out["num_samples"] == 5
    assert out["inpainting/psnr_in"] == PSNR_CAP_DB and out["inpainting/ssim_in"] == pytest.approx(1.0)
    assert out["inpainting/object_iou_in"] == 1.0 and out["inpainting/hole_kept"] == 0.0
    assert out["grounding/box_iou"] == 1.0 and out["grounding/hit@0.5"] == 1.0
    assert out["grounding/psnr_out"] == PSNR_CAP_DB
    assert out["control/edge_f1"] == 1.0
    assert (
        out["customized/subject_ncc"] == pytest.approx(1.0, abs=1e-4)
        and out["customized/prompt_fidelity"] == 1.0
    )
    assert out["editing/edit_success"] == 1.0 and out["editing/preservation"] == 1.0
    rows = [json.loads(line) for line in (tmp_path / "sw.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == ["inp", "gro", "con", "cus", "edi"]
    assert "grounding/box_iou" in rows[1] and "grounding/box_iou" not in rows[0]


def test_blank_output_is_clearly_worse() -> None:
    blank = run_protocol(examples(), lambda s: np.zeros((48, 48, 3), np.uint8), ShapeWorldScorer())
    assert blank["inpainting/psnr_in"] < 15 and blank["inpainting/object_iou_in"] == 0.0
    copied = run_protocol(examples()[:1], lambda s: s["source"], ShapeWorldScorer())
    assert copied["inpainting/hole_kept"] == 1.0 and copied["inpainting/object_iou_in"] == 0.0
    assert blank["grounding/box_iou"] == 0.0 and blank["grounding/psnr_out"] < 15
    assert blank["control/edge_f1"] == 0.0
    assert blank["customized/subject_ncc"] == 0.0 and blank["customized/prompt_fidelity"] == 0.0
    assert blank["editing/edit_success"] < 0.5 and blank["editing/preservation"] < 0.2


def test_unknown_task_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown ShapeWorld task"):
        score_sample({"task": "pose"}, np.zeros((8, 8, 3), np.uint8))
    scores = score_sample({"task": "customized", "source": base_scene(), "image": base_scene()}, base_scene())
    assert math.isnan(scores["customized/prompt_fidelity"])  # nothing named


def test_builder_examples_from_generated_shards_score_perfect(shapeworld_dir: Path) -> None:
    """The task builders' own examples (ShapeWorld shards -> TaskBuilder) score perfect when the
    output is the target, at the native size and resized: metrics and pipeline agree."""
    import webdataset as wds

    from cologen.data.builders import TaskBuilder
    from cologen.data.records import decode_sample

    for resolution in (32, 64):
        builder = TaskBuilder(resolution=resolution, stratified=False)
        for task in ("inpainting", "grounding", "control", "customized", "editing"):
            urls = sorted(str(p) for p in (Path(shapeworld_dir) / task).glob("val-*.tar"))
            stream = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None)
            examples = [
                builder(decode_sample(raw), task, np.random.default_rng(i)) for i, raw in enumerate(stream)
            ]
            assert examples, task
            perfect = run_protocol(examples[:12], lambda ex: ex["target"], ShapeWorldScorer())
            blank = run_protocol(examples[:12], lambda ex: np.zeros_like(ex["target"]), ShapeWorldScorer())
            for name, value in perfect.items():
                if name == "num_samples" or name.endswith(("edit_l1", "hole_kept")):  # no best value
                    continue
                best = PSNR_CAP_DB if "psnr" in name else 1.0
                assert value == pytest.approx(best, abs=1e-6), (resolution, name, value)
                assert blank[name] < best - 0.3 * abs(best), (resolution, name, blank[name])


def test_copying_the_reference_scores_near_zero_on_customized(shapeworld_dir: Path) -> None:
    """ShapeWorld's customized prompts fix the target's layout (subject cell and size, background colour, the
    other objects' cells) and the two views differ in all of them, so the base's shortcut, copying its source,
    no longer scores well: subject NCC (the reference's subject found anywhere) rewards the copy, the layout
    scores do not."""
    import webdataset as wds

    from cologen.data.builders import TaskBuilder
    from cologen.data.records import decode_sample

    builder = TaskBuilder(resolution=32, stratified=False)
    urls = sorted(str(p) for p in (Path(shapeworld_dir) / "customized").glob("*.tar"))
    stream = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None)
    examples = [builder(decode_sample(raw), "customized", np.random.default_rng(i)) for i, raw in enumerate(stream)]
    assert len(examples) >= 100 and all("subject_box" in ex["meta"]["build"] for ex in examples)
    copy = run_protocol(examples, lambda ex: ex["source"], ShapeWorldScorer())
    assert copy["customized/subject_ncc"] > 0.8  # the old metric's reward for copying
    assert copy["customized/subject_score"] < 0.1
    assert copy["customized/prompt_fidelity"] < 0.25
    perfect = run_protocol(examples, lambda ex: ex["target"], ShapeWorldScorer())
    assert perfect["customized/subject_score"] == 1.0 and perfect["customized/prompt_fidelity"] == 1.0


def test_t2i_scores_where_the_captions_objects_are_drawn(shapeworld_dir: Path) -> None:
    """The base's text-to-image score (`cologen eval shapeworld --tasks t2i`): the scene itself scores object IoU 1,
    the same scene with its objects moved scores clearly less, a blank or a canvas of one object colour
    (the right colour everywhere, no place or shape) near 0."""
    import webdataset as wds

    from cologen.data.builders import TaskBuilder
    from cologen.data.records import decode_sample

    urls = sorted(str(p) for p in (Path(shapeworld_dir) / "inpainting").glob("val-*.tar"))
    stream = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None)
    builder = TaskBuilder(resolution=32, stratified=False)
    examples = [builder(decode_sample(raw), "t2i", np.random.default_rng(i)) for i, raw in enumerate(stream)][:12]
    assert examples and all(ex["task"] == "t2i" for ex in examples)

    def score(make) -> float:
        return run_protocol(examples, make, ShapeWorldScorer())["t2i/object_iou"]

    assert score(lambda ex: ex["target"]) == 1.0
    moved = score(lambda ex: np.roll(np.asarray(ex["target"]), 10, axis=1))
    assert moved < 0.6
    assert score(lambda ex: np.zeros_like(ex["target"])) == 0.0

    def one_colour(ex) -> np.ndarray:
        rgb = ex["meta"]["record"]["objects"][0]["rgb"]
        return np.broadcast_to(np.asarray(rgb, np.uint8), np.asarray(ex["target"]).shape[:2] + (3,)).copy()

    assert score(one_colour) < 0.3


def test_editing_objects_kept_reads_the_source_scene_from_the_record() -> None:
    edit = next(e for e in examples() if e["task"] == "editing")  # the red square turned blue
    sample = dict(edit, meta={"record": {"edit": {"source_objects": [{"rgb": list(RED)}, {"rgb": list(BLUE)}]}}})
    assert score_sample(sample, edit["image"])["editing/objects_kept"] == 1.0
    circle_gone = edit["image"].copy()
    circle_gone[24:41, 24:41] = BG
    assert score_sample(sample, circle_gone)["editing/objects_kept"] == 0.0
    given = dict(edit, object_rgbs=[BLUE])  # a sample's own colours win over the record's
    assert score_sample(given, circle_gone)["editing/objects_kept"] == 0.0
    assert "editing/objects_kept" not in score_sample(edit, edit["image"])  # no scene to read


def test_probe_kinds_come_from_the_builders_and_split_the_summary(shapeworld_dir: Path) -> None:
    """`cologen eval shapeworld --by-kind`: each task's probes carry the kind their builder drew, and the summary
    adds a row per kind over that kind's probes alone."""
    import webdataset as wds

    from cologen.commands.evaluate import summarize
    from cologen.data.builders import TaskBuilder
    from cologen.data.records import decode_sample
    from cologen.eval.shapeworld import probe_kind

    builder = TaskBuilder(resolution=32, stratified=False)
    kinds = {}
    for task in ("inpainting", "grounding", "control", "customized", "editing"):
        urls = sorted(str(p) for p in (Path(shapeworld_dir) / task).glob("val-*.tar"))
        stream = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None)
        kinds[task] = {probe_kind(builder(decode_sample(raw), task, np.random.default_rng(i)))
                       for i, raw in enumerate(stream)}
    assert kinds["customized"] == {None}
    assert kinds["grounding"] <= {"box", "mask", "class_boxes"} and kinds["grounding"]
    assert kinds["control"] <= {"canny", "depth", "seg"} and kinds["control"]
    assert kinds["editing"] <= {"recolor", "remove", "add", "move", "resize"} and len(kinds["editing"]) > 1
    assert None not in kinds["inpainting"]

    lines = [{"task": "editing", "routing": "learned", "kind": k, "editing/edit_success": v}
             for k, v in (("move", 0.2), ("move", 0.4), ("resize", 0.0))]
    lines.append({"task": "customized", "routing": "learned", "customized/subject_score": 0.5})
    table = summarize(lines, by_kind=True)
    assert table["learned/editing/edit_success"]["mean"] == pytest.approx(0.2)
    assert table["learned/editing[move]/edit_success"]["mean"] == pytest.approx(0.3)
    assert table["learned/editing[resize]/edit_success"]["n"] == 1
    assert "learned/customized/subject_score" in table and not any("customized[" in k for k in table)
    assert not any("[" in k for k in summarize(lines))  # the kinds only when asked


def test_other_sources_samples_each_probe_with_the_next_ones_condition_and_scores_it_against_its_own(
        shapeworld_dir, monkeypatch):
    """`cologen eval shapeworld --other-sources`: what a model takes from its condition image shows as the drop from
    its own condition to another probe's, each scored against its own target."""
    import torch

    from cologen.commands import evaluate as ev
    from cologen.eval import probes as pr

    probes = ev.load_probes(str(shapeworld_dir), ["control"], 4)
    sampled, scored = [], []

    def fake_sample(module, batch, **kwargs):
        sampled.append([p["source"] for p in batch])
        return [p["target"] for p in batch], [], 0, 0

    def fake_score(batch, outputs, metrics="shapeworld"):
        scored.append(list(batch))
        return [{"control/ssim": float(torch.equal(p["target"], o))} for p, o in zip(batch, outputs)]

    monkeypatch.setattr(pr, "sample_probes", fake_sample)
    monkeypatch.setattr(pr, "score_probes", fake_score)
    module = type("M", (), {"eval": lambda self: None, "model": type("X", (), {"num_active": 1})(),
                            "task_experts": {}})()
    ev.evaluate(module, probes, other_sources=True)
    own = probes["control"]
    assert all(torch.equal(s, own[(i + 1) % 4]["source"]) for i, s in enumerate(sampled[0]))
    assert all(not torch.equal(s, p["source"]) for s, p in zip(sampled[0], own))  # another scene's map
    assert [p["key"] for p in scored[0]] == [p["key"] for p in own]  # scored as the probes themselves
    ev.evaluate(module, probes)
    assert all(torch.equal(s, p["source"]) for s, p in zip(sampled[1], own))
