"""Benchmark protocol runners end to end: tiny saved models, a handful of synthetic samples, a
``generate`` callable standing in for the sampler."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from cologen.eval import run_dreambench, run_editing, run_emu_edit, run_magicbrush, run_multigen
from cologen.metrics.models import MissingModelPath
from cologen.testing.metric_models import save_tiny_segmenter


@pytest.fixture(scope="module")
def models(metric_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    seg = save_tiny_segmenter(tmp_path_factory.mktemp("seg") / "seg", num_labels=4)
    return {**metric_models, "seg": seg, "hed": metric_models["map_detector"]}


def picture(seed: int, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), rng.integers(100, 240, 3), np.uint8)
    for _ in range(3):
        x, y = (int(v) for v in rng.integers(4, size - 12, 2))
        img[y : y + 10, x : x + 10] = rng.integers(0, 255, 3)
    return Image.fromarray(img)


def noise(sample: dict) -> Image.Image:
    return Image.fromarray(np.random.default_rng(99).integers(0, 256, (40, 40, 3)).astype(np.uint8))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dreambench(models: dict[str, Path], tmp_path: Path) -> None:
    samples = [
        {
            "key": f"s{i}",
            "reference": picture(i),
            "prompt": f"a photo of sks thing {i}",
            "clip_prompt": "a photo of a thing",
        }
        for i in range(5)
    ]
    copy = run_dreambench(
        samples,
        lambda s: s["reference"],
        clip_path=models["clip"],
        dino_path=models["dino"],
        device="cpu",
        batch_size=2,
        jsonl_path=tmp_path / "db.jsonl",
        output_dir=tmp_path / "images",
    )
    assert copy["dino"] == pytest.approx(1.0, abs=1e-5) and copy["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert -1 <= copy["clip_t"] <= 1 and copy["num_samples"] == 5
    rows = read_jsonl(tmp_path / "db.jsonl")
    assert [r["key"] for r in rows] == ["s0", "s1", "s2", "s3", "s4"] and set(rows[0]) >= {
        "dino",
        "clip_i",
        "clip_t",
    }
    assert len(list((tmp_path / "images").glob("*.png"))) == 5

    wrong = run_dreambench(
        samples, noise, clip_path=models["clip"], dino_path=models["dino"], device="cpu", limit=3
    )
    assert wrong["num_samples"] == 3 and wrong["dino"] < copy["dino"] - 1e-3


def test_dreambench_without_paths_says_what_to_supply(models: dict[str, Path]) -> None:
    with pytest.raises(MissingModelPath, match="^clip_path is not set"):
        run_dreambench([], noise, clip_path=None, dino_path=models["dino"])
    with pytest.raises(MissingModelPath, match="^dino_path is not set"):
        run_dreambench([], noise, clip_path=models["clip"], dino_path=None)


def test_editing_magicbrush_and_emu_edit(models: dict[str, Path], tmp_path: Path) -> None:
    samples = []
    for i in range(4):
        src = picture(10 + i)
        tgt = np.asarray(src).copy()
        tgt[5:20, 5:20] = (0, 0, 255)
        samples.append(
            {
                "source": src,
                "image": Image.fromarray(tgt),
                "prompt": "make the corner blue",
                "caption": "a blue corner",
                "source_caption": "a plain corner",
            }
        )
    kw = dict(clip_path=models["clip"], dino_path=models["dino"], device="cpu", batch_size=3)
    perfect = run_magicbrush(samples, lambda s: s["image"], jsonl_path=tmp_path / "mb.jsonl", **kw)
    assert perfect["l1_target"] == 0.0
    assert perfect["clip_i_target"] == pytest.approx(1.0, abs=1e-5) and perfect[
        "dino_target"
    ] == pytest.approx(1.0, abs=1e-5)
    assert perfect["l1"] > 0 and {"clip_t", "clip_dir", "clip_i", "dino"} <= set(perfect)

    unchanged = run_emu_edit(
        [{k: v for k, v in s.items() if k != "image"} for s in samples], lambda s: s["source"], **kw
    )
    assert unchanged["l1"] == 0.0 and unchanged["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert "l1_target" not in unchanged

    # An output at another size is compared at the source's size.
    resized = run_editing(samples, lambda s: s["image"].resize((64, 64)), **kw)
    assert resized["l1_target"] < 0.05
    assert len(read_jsonl(tmp_path / "mb.jsonl")) == 4


def test_editing_skips_ground_truth_metrics_without_a_target(models: dict[str, Path], tmp_path: Path) -> None:
    """Benchmarks without ground-truth edits store the source as ``image`` with ``eval.has_target: false``:
    scoring it as a target would reward doing nothing."""
    samples = []
    for i in range(4):
        src = picture(30 + i)
        edited = np.asarray(src).copy()
        edited[5:20, 5:20] = (0, 0, 255)
        sample = {"key": f"e{i}", "source": src, "prompt": "make the corner blue"}
        if i % 2:  # emu_edit / gedit_bench style: `image` is only the source again
            sample |= {"image": src, "eval": {"benchmark": "emu_edit", "has_target": False}}
        else:
            sample |= {"image": Image.fromarray(edited), "eval": {"benchmark": "magicbrush", "has_target": True}}
        samples.append(sample)
    samples[3] = {k: v for k, v in samples[3].items() if k != "eval"} | {"meta": {"record": {"eval": {"has_target": False}}}}
    kw = dict(clip_path=models["clip"], dino_path=models["dino"], device="cpu", batch_size=3)
    out = run_editing(samples, lambda s: np.asarray(s["source"]), jsonl_path=tmp_path / "e.jsonl", **kw)
    rows = {r["key"]: r for r in read_jsonl(tmp_path / "e.jsonl")}
    assert all("l1_target" in rows[k] and "dino_target" in rows[k] for k in ("e0", "e2"))
    assert not any(k.endswith("_target") for key in ("e1", "e3") for k in rows[key])
    assert out["l1_target"] > 0  # the mean is over the two real targets only (returning the source is wrong)


def control_samples(n: int = 3) -> list[dict]:
    out = []
    for i in range(n):
        img = picture(20 + i)
        arr = np.asarray(img)
        seg = np.zeros((40, 40), np.uint8)
        seg[arr[..., 0] > 128] = 1
        seg[arr[..., 2] > 128] += 2
        depth = cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY)
        out.append(
            {
                "key": f"c{i}",
                "image": img,
                "text": "some shapes",
                "seg_map": Image.fromarray(seg),
                "depth": Image.fromarray(depth),
            }
        )
    return out


def test_multigen_canny(models: dict[str, Path], tmp_path: Path) -> None:
    samples = control_samples()
    kw = dict(condition="canny", clip_path=models["clip"], device="cpu", resolution=64)
    perfect = run_multigen(samples, lambda s: s["image"], jsonl_path=tmp_path / "mg.jsonl", **kw)
    assert perfect["edge_f1"] == 1.0 and 0 <= perfect["clip_score"] <= 100
    blank = run_multigen(samples, lambda s: Image.new("RGB", (40, 40), (128, 128, 128)), **kw)
    assert blank["edge_f1"] == 0.0
    # A stored canny condition map is used as is.
    with_condition = [
        {
            **s,
            "condition": Image.fromarray(
                cv2.Canny(np.asarray(s["image"].resize((64, 64), Image.BICUBIC)), 100, 200)
            ),
        }
        for s in samples
    ]
    assert run_multigen(with_condition, lambda s: s["image"], **kw)["edge_f1"] == 1.0
    with pytest.raises(MissingModelPath, match="^clip_path is not set"):
        run_multigen(samples, noise, condition="canny")


def test_multigen_depth_seg_and_lines(models: dict[str, Path]) -> None:
    samples = control_samples()
    depth = run_multigen(
        samples,
        lambda s: s["image"],
        condition="depth",
        depth_path=models["depth"],
        device="cpu",
        resolution=32,
    )
    assert 0 <= depth["depth_rmse"] <= 255
    no_depth = [{k: v for k, v in s.items() if k != "depth"} for s in samples]
    self_consistent = run_multigen(
        no_depth,
        lambda s: s["image"],
        condition="depth",
        depth_path=models["depth"],
        device="cpu",
        resolution=32,
    )
    assert self_consistent["depth_rmse"] == pytest.approx(0.0, abs=1e-3)  # same network on the same image

    seg = run_multigen(
        samples,
        lambda s: s["image"],
        condition="seg",
        segmenter_path=models["seg"],
        device="cpu",
        resolution=32,
        fid_features=models["inception"],
    )
    assert 0 <= seg["miou"] <= 1 and abs(seg["fid"]) < 1e-3

    lines = run_multigen(
        samples, lambda s: s["image"], condition="hed", hed_path=models["hed"], device="cpu", resolution=32
    )
    assert lines["ssim"] == pytest.approx(1.0, abs=1e-6)
    worse = run_multigen(samples, noise, condition="hed", hed_path=models["hed"], device="cpu", resolution=32)
    assert worse["ssim"] < 0.9

    detector = run_multigen(
        samples,
        lambda s: s["image"],
        condition="lineart",
        device="cpu",
        resolution=32,
        lineart_path=lambda x: x.mean(dim=1, keepdim=True),  # a callable works in place of a file
    )
    assert detector["ssim"] == pytest.approx(1.0, abs=1e-6)

    for condition, field in [("depth", "depth_path"), ("seg", "segmenter_path"), ("lineart", "lineart_path")]:
        with pytest.raises(MissingModelPath, match=f"^{field} is not set"):
            run_multigen(samples, noise, condition=condition)
    with pytest.raises(ValueError, match="condition must be one of"):
        run_multigen(samples, noise, condition="pose")  # type: ignore[arg-type]


def test_multigen_seg_miou_is_dataset_level(models: dict[str, Path], tmp_path: Path) -> None:
    samples = control_samples(2)
    out = run_multigen(
        samples,
        lambda s: s["image"],
        condition="seg",
        segmenter_path=models["seg"],
        device="cpu",
        resolution=32,
        jsonl_path=tmp_path / "seg.jsonl",
        reduce_zero_label=True,
    )
    rows = read_jsonl(tmp_path / "seg.jsonl")
    assert len(rows) == 2 and all("miou" in r for r in rows)
    assert out["num_samples"] == 2.0 and (np.isnan(out["miou"]) or 0 <= out["miou"] <= 1)
    assert torch.is_tensor(torch.tensor(out["miou"]))
