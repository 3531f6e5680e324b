"""Benchmark protocol runners end to end: tiny saved models, a handful of synthetic samples, a
``generate`` callable standing in for the sampler."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from cologen.errors import UsageError
from cologen.eval.dreambench import DreamBenchScorer
from cologen.eval.editing import EditingScorer
from cologen.eval.loop import run_protocol
from cologen.eval.multigen import MultiGenScorer
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


def run(scorer: type, samples, generate, **kwargs) -> dict[str, float]:
    """`run_protocol` with the scorer built from the scorer's own keyword arguments."""
    loop = {k: kwargs.pop(k) for k in ("batch_size", "limit", "jsonl_path", "output_dir") if k in kwargs}
    return run_protocol(samples, generate, scorer(**kwargs), **loop)


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
    copy = run(DreamBenchScorer,
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

    wrong = run(DreamBenchScorer,
        samples, noise, clip_path=models["clip"], dino_path=models["dino"], device="cpu", limit=3
    )
    assert wrong["num_samples"] == 3 and wrong["dino"] < copy["dino"] - 1e-3


def test_dreambench_without_paths_says_what_to_supply(models: dict[str, Path]) -> None:
    with pytest.raises(MissingModelPath, match="^clip_path is not set"):
        run(DreamBenchScorer, [], noise, clip_path=None, dino_path=models["dino"])
    with pytest.raises(MissingModelPath, match="^dino_path is not set"):
        run(DreamBenchScorer, [], noise, clip_path=models["clip"], dino_path=None)


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
    perfect = run(EditingScorer, samples, lambda s: s["image"], jsonl_path=tmp_path / "mb.jsonl", **kw)
    assert perfect["l1_target"] == 0.0
    assert perfect["clip_i_target"] == pytest.approx(1.0, abs=1e-5) and perfect[
        "dino_target"
    ] == pytest.approx(1.0, abs=1e-5)
    assert perfect["l1"] > 0 and {"clip_t", "clip_dir", "clip_i", "dino"} <= set(perfect)

    unchanged = run(EditingScorer,
        [{k: v for k, v in s.items() if k != "image"} for s in samples], lambda s: s["source"], **kw
    )
    assert unchanged["l1"] == 0.0 and unchanged["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert "l1_target" not in unchanged

    # An output at another size is compared at the source's size.
    resized = run(EditingScorer, samples, lambda s: s["image"].resize((64, 64)), **kw)
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
    out = run(EditingScorer, samples, lambda s: np.asarray(s["source"]), jsonl_path=tmp_path / "e.jsonl", **kw)
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
    perfect = run(MultiGenScorer, samples, lambda s: s["image"], jsonl_path=tmp_path / "mg.jsonl", **kw)
    assert perfect["edge_f1"] == 1.0 and 0 <= perfect["clip_score"] <= 100
    blank = run(MultiGenScorer, samples, lambda s: Image.new("RGB", (40, 40), (128, 128, 128)), **kw)
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
    assert run(MultiGenScorer, with_condition, lambda s: s["image"], **kw)["edge_f1"] == 1.0
    with pytest.raises(MissingModelPath, match="^clip_path is not set"):
        run(MultiGenScorer, samples, noise, condition="canny")


def test_multigen_depth_seg_and_lines(models: dict[str, Path]) -> None:
    samples = control_samples()
    depth = run(MultiGenScorer,
        samples,
        lambda s: s["image"],
        condition="depth",
        depth_path=models["depth"],
        device="cpu",
        resolution=32,
    )
    assert 0 <= depth["depth_rmse"] <= 255
    no_depth = [{k: v for k, v in s.items() if k != "depth"} for s in samples]
    self_consistent = run(MultiGenScorer,
        no_depth,
        lambda s: s["image"],
        condition="depth",
        depth_path=models["depth"],
        device="cpu",
        resolution=32,
    )
    assert self_consistent["depth_rmse"] == pytest.approx(0.0, abs=1e-3)  # same network on the same image

    seg = run(MultiGenScorer,
        samples,
        lambda s: s["image"],
        condition="seg",
        segmenter_path=models["seg"],
        device="cpu",
        resolution=32,
        fid_features=models["inception"],
    )
    assert 0 <= seg["miou"] <= 1 and abs(seg["fid"]) < 1e-3

    lines = run(MultiGenScorer,
        samples, lambda s: s["image"], condition="hed", hed_path=models["hed"], device="cpu", resolution=32
    )
    assert lines["ssim"] == pytest.approx(1.0, abs=1e-6)
    worse = run(MultiGenScorer, samples, noise, condition="hed", hed_path=models["hed"], device="cpu", resolution=32)
    assert worse["ssim"] < 0.9

    detector = run(MultiGenScorer,
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
            run(MultiGenScorer, samples, noise, condition=condition)
    with pytest.raises(ValueError, match="condition must be one of"):
        run(MultiGenScorer, samples, noise, condition="pose")  # type: ignore[arg-type]


def test_multigen_seg_miou_is_dataset_level(models: dict[str, Path], tmp_path: Path) -> None:
    samples = control_samples(2)
    out = run(MultiGenScorer,
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


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CoLoGen checkpoint (random base, two experts) saved the way training saves one."""
    import lightning as L
    from torch.utils.data import DataLoader

    from cologen.model.config import PRWConfig
    from cologen.model.presets import TinyPreset
    from cologen.module import CoLoGenModule
    from cologen.sampling.sampler import SamplerConfig

    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    module = CoLoGenModule(preset=TinyPreset(base=None, width=64, heads=2, double_layers=1, single_layers=2, seed=3),
                           prw=PRWConfig(num_experts=2, rank=4, alpha=8), sampler=SamplerConfig(steps=2))
    t = torch.rand(2, 3, 32, 32) * 2 - 1
    batch = {"target": t, "source": t.flip(-1), "has_source": torch.ones(2, dtype=torch.bool),
             "prompt": ["a", "b"], "task": ["customized", "editing"]}
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        default_root_dir=root)
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    trainer.save_checkpoint(root / "model.ckpt")
    return root / "model.ckpt"


def test_cologen_eval_runs_a_benchmark_from_its_shards(models, tiny_checkpoint, tmp_path, capsys):
    """`cologen eval dreambench`: the recipe's evaluation shards -> the checkpoint (or its export) -> the scorer,
    writing metrics.json, table.md, one JSONL line and one image per sample."""
    from cologen.commands.evaluate import main
    from cologen.commands.export import export
    from cologen.testing.recipe_fixtures import dreambench_folder
    from data_recipes import dreambench

    shards = tmp_path / "shards"
    dreambench.main(["--input", str(dreambench_folder(tmp_path)), "--output", str(shards), "--quiet"])
    weights = ["--clip", str(models["clip"]), "--dino", str(models["dino"]), "--device", "cpu"]
    results = {}
    for name, model in (("ckpt", tiny_checkpoint), ("export", export(str(tiny_checkpoint), str(tmp_path / "exp")))):
        out = tmp_path / name
        main(["dreambench", "--ckpt", str(model), "--data", str(shards), "--out", str(out), "--limit", "3", *weights])
        results[name] = json.loads((out / "metrics.json").read_text())
        assert results[name]["num_samples"] == 3 and {"dino", "clip_i", "clip_t"} <= set(results[name])
        assert len(read_jsonl(out / "scores.jsonl")) == 3 and len(list((out / "images").glob("*.png"))) == 3
        assert "| dino |" in (out / "table.md").read_text()
    assert results["ckpt"] == pytest.approx(results["export"], abs=1e-5)  # the export generates the same images
    assert "clip_t" in capsys.readouterr().out

    for argv, message in ((["--data", str(shards), *weights[2:]], "clip_path is not set"),
                          (["--data", str(tmp_path / "none"), *weights], "no shards")):
        with pytest.raises(SystemExit) as exit_info:
            main(["dreambench", "--ckpt", str(tiny_checkpoint), "--out", str(tmp_path / "x"), *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err


@pytest.mark.parametrize("condition", ["canny", "depth", "seg"])
def test_multigen_protocol_gives_the_model_its_condition_and_the_scorer_its_references(tmp_path, condition):
    """What `cologen eval multigen` reads from data_recipes.multigen's evaluation shards."""
    from argparse import Namespace

    from cologen.data.control import canny
    from cologen.eval.protocols import PROTOCOLS, read_eval_shards
    from cologen.testing.recipe_fixtures import multigen_table, write_parquet
    from data_recipes import multigen

    kind = "canny" if condition == "canny" else condition
    parquet = write_parquet(multigen_table(kind, 2), tmp_path / "train-00000.parquet")
    multigen.main(["--input", str(parquet), "--output", str(tmp_path / "shards"), "--quiet", "--eval",
                   *(["--types", "canny"] if condition == "canny" else [])])
    pairs = list(read_eval_shards(tmp_path / "shards"))
    assert len(pairs) == 2
    args = Namespace(condition=condition, hed=None, lineart=None)
    for stored, raw in pairs:
        sample = PROTOCOLS["multigen"].to_sample(stored, raw, args)
        assert sample["prompt"] == stored.record["prompt"] and sample["image"] is stored.image
        assert sample["condition"].shape == stored.image.shape  # an RGB image the model takes as its source
        if condition == "canny":
            np.testing.assert_array_equal(sample["condition"][..., 0], canny(stored.image))
        elif condition == "depth":
            np.testing.assert_array_equal(sample["depth"], stored.depth)
        else:
            assert sample["seg_map"].ndim == 2 and sample["seg_map"].shape == stored.image.shape[:2]


@pytest.mark.timeout(300)
def test_stage_end_benchmark_scores_the_step_that_ends_and_logs_its_table(models, shapeworld_dir, tmp_path):
    """StageEndBenchmark: at the validation that closes the customized step, DreamBench on the recipe's shards with
    the live model (metrics.json, table, `benchmark/dreambench/*` scalars); nothing after the inpainting step;
    bad inputs are one-line errors when the run starts."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    from cologen.callbacks import StageEndBenchmark
    from cologen.curriculum.callback import CurriculumCallback
    from cologen.curriculum.spec import CurriculumSpec, CurriculumStep
    from cologen.data.datamodule import MixtureDataModule
    from cologen.errors import MissingInput
    from cologen.model.config import PRWConfig, RouterConfig
    from cologen.model.presets import TinyPreset
    from cologen.module import CoLoGenModule
    from cologen.testing.recipe_fixtures import dreambench_folder
    from data_recipes import dreambench

    shards = tmp_path / "dreambench"
    dreambench.main(["--input", str(dreambench_folder(tmp_path)), "--output", str(shards), "--quiet"])
    weights = f"--clip {models['clip']} --dino {models['dino']} --device cpu"
    tasks = ("inpainting", "customized")
    spec = CurriculumSpec(steps=[
        CurriculumStep(name="inpainting", mixture={"inpainting": 1.0}, steps=2, lr=1e-2, rho=1.0, alpha=0.0),
        CurriculumStep(name="customized", mixture={"customized": 1.0}, steps=2, lr=1e-2, rho=0.8, alpha=0.5)])

    def fit(benchmarks: dict[str, str]) -> Path:
        root = tmp_path / "run"
        module = CoLoGenModule(preset=TinyPreset(base=None, width=32, heads=2, double_layers=1, single_layers=1),
                               prw=PRWConfig(num_experts=2, rank=4, alpha=8, router=RouterConfig(entry_warmup_steps=1)))
        data = MixtureDataModule(train_shards={t: str(shapeworld_dir / t / "train-*.tar") for t in tasks},
                                 val_shards={t: str(shapeworld_dir / t / "val-*.tar") for t in tasks},
                                 val_tasks=list(tasks), mixture={"inpainting": 1.0}, batch_size=2, num_workers=0,
                                 batches_per_epoch=4, shuffle_buffer=8, val_samples_per_task=2)
        trainer = L.Trainer(accelerator="cpu", default_root_dir=root, val_check_interval=2,
                            check_val_every_n_epoch=None, limit_val_batches=1, num_sanity_val_steps=0,
                            logger=CSVLogger(root, name="csv"), enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False,
                            callbacks=[CurriculumCallback(spec), StageEndBenchmark(benchmarks, limit=2, steps=2)])
        trainer.fit(module, datamodule=data)
        return root

    root = fit({"customized": f"dreambench --data {shards} {weights}"})
    assert [p.name for p in (root / "benchmarks").iterdir()] == ["step0000004_dreambench"]
    out = root / "benchmarks" / "step0000004_dreambench"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 2 and len(list((out / "images").glob("*.png"))) == 2
    (path,) = (root / "csv").glob("version_*/metrics.csv")
    rows = [r for r in csv.DictReader(open(path)) if r.get("benchmark/dreambench/dino")]
    assert len(rows) == 1 and float(rows[0]["benchmark/dreambench/dino"]) == pytest.approx(metrics["dino"])

    for benchmarks, error, message in (
            ({"editing": f"dreambench --data {shards} {weights}"}, ValueError, "not curriculum steps"),
            ({"inpainting": f"dreambench --data {shards} {weights}"}, ValueError, "scores customized"),
            ({"customized": f"dreambench --data {tmp_path / 'none'} {weights}"}, MissingInput, "no shards"),
            ({"customized": f"dreambench --data {shards} --clip {tmp_path / 'no_clip'}"}, MissingInput,
             "does not exist"),
            ({"customized": f"dreambench --ckpt x --data {shards}"}, UsageError, "neither --ckpt"),
            ({"customized": f"dreambench --data {shards} --clipp x"}, UsageError, "unrecognized arguments: --clipp")):
        with pytest.raises(error, match=message):
            fit(benchmarks)
