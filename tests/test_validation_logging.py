"""SampleValidation, the routing statistics and the logging of runs: a tiny fit with an offline W&B run and a CSV
logger, then `trainer.validate` on the same weights."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image, ImageFont

from cologen.callbacks import MetricsSummary, SampleValidation
from cologen.callbacks.grids import probe_caption, probe_grid, wrap
from cologen.callbacks.media import log_image, log_table
from cologen.callbacks.routing import (
    count_routing,
    expert_labels,
    routing_figure,
    timestep_bin,
    write_usage_tables,
)
from cologen.callbacks.summary import merge_task_keys
from cologen.curriculum.callback import CurriculumCallback
from cologen.curriculum.spec import CurriculumSpec, CurriculumStep
from cologen.data import MixtureDataModule
from cologen.model.config import PRWConfig
from cologen.model.presets import TinyPreset
from cologen.module import CoLoGenModule
from data_recipes.shapeworld import shard_patterns


# ------------------------------------------------------------------------------------------------ unit tests
def test_routing_counts_per_block_bin_and_expert(tmp_path):
    t = torch.tensor
    steps = [
        (0.9, {"double.0": t([0, 1]), "single.0": t([1, 1])}),
        (0.8, {"double.0": t([0, 0]), "single.0": t([1, 1])}),
        (0.1, {"double.0": t([1, 1]), "single.0": t([[0, 1], [1, 1]])}),  # token granularity: (B, N)
    ]
    counts = count_routing(steps, num_experts=3, bins=4)
    assert counts.blocks == ["double.0", "single.0"] and counts.counts.shape == (2, 4, 3)
    shares = counts.shares()
    np.testing.assert_allclose(shares[0, 3], [0.75, 0.25, 0.0])  # t 0.9, 0.8 -> last bin
    np.testing.assert_allclose(shares[1, 0], [0.25, 0.75, 0.0])  # t 0.1 -> first bin, 4 tokens
    assert np.isnan(shares[:, 1:3]).all()  # bins no step visited
    np.testing.assert_allclose(counts.usage(), [4 / 14, 10 / 14, 0.0])
    assert [timestep_bin(x, 4) for x in (0.0, 0.249, 0.25, 1.0)] == [0, 0, 1, 3]
    assert count_routing([(0.5, {})], 2, 4) is None  # text-to-image: nothing routed

    write_usage_tables({"editing": counts}, tmp_path, global_step=7)
    rows = list(csv.reader(open(tmp_path / "routing_usage.csv")))
    assert rows[0] == ["task", "expert0", "expert1", "expert2"] and rows[1][0] == "editing"
    assert float(rows[1][2]) == pytest.approx(10 / 14, abs=1e-4)
    detail = json.loads((tmp_path / "routing_usage.json").read_text())
    assert detail["tasks"]["editing"]["share_block_bin_expert"][0][1] == [None, None, None]
    figure = Image.open(routing_figure({"editing": counts, "control": counts}, tmp_path / "routing.png",
                                       expert_names=["inpainting", "grounding"]))
    assert figure.size[0] > 300 and figure.size[1] > 300
    # experts are named after the curriculum step that introduced them
    assert expert_labels(3, ["inpainting", "grounding"]) == ["e0 inpainting", "e1 grounding", "expert 2"]


def test_probe_grid_layout_and_upscale():
    images = [torch.full((3, 32, 32), v) for v in (-1.0, 0.0, 1.0)]
    grid = probe_grid([None, images[0], images[1]], images, images[::-1])
    cell, pad, label = 128 + 2, 2, 52  # 32 px upscaled x4 (nearest), 2 px padding, label column
    assert grid.shape == (3 * cell + pad, label + 3 * cell + pad, 3) and grid.dtype == np.uint8
    assert (grid[2 + 5, label + 2 + 5] == 200).all()  # a missing source is a grey cell
    assert (grid[cell + 2 + 64, label + 2 + 64] == 0).all()  # output row, first probe: black (-1)
    assert (grid[2 * cell + 2 + 64, label + 2 + 64] == 255).all()  # target row, first probe: white (+1)

    # with captions: each probe's prompt (wrapped to its column) and scores under it
    prompts = ["draw a cyan box around the small purple triangle at the top left", "make the red square blue", "x"]
    captions = [probe_caption(p, {"grounding/box_iou": 0.25, "grounding/hit": float("nan")}) for p in prompts]
    assert captions[0].splitlines()[1:] == ["box_iou 0.25"]  # NaN scores (not measurable) are left out
    captioned = probe_grid([None, images[0], images[1]], images, images[::-1], captions=captions)
    lines = wrap(prompts[0], 128 - 2, ImageFont.load_default())
    assert len(lines) >= 3 and " ".join(lines) == prompts[0]
    assert captioned.shape[0] == 3 * cell + pad + (len(lines) + 1) * 12 + 2 * pad  # tallest caption + scores
    np.testing.assert_array_equal(captioned[:3 * cell + pad], grid)  # the images are unchanged
    below = captioned[3 * cell + pad:]
    for c in range(3):  # text (dark pixels) under every column, inside it
        column = below[:, label + 2 + c * cell: label + 2 + c * cell + 128]
        assert (column < 100).any()


def test_every_n_val_and_validate_always_samples():
    cb = SampleValidation(every_n_val=2)
    fit = SimpleNamespace(sanity_checking=False, state=SimpleNamespace(fn=TrainerFn.FITTING))
    assert [cb._due(fit) for _ in range(4)] == [False, True, False, True]
    assert not cb._due(SimpleNamespace(sanity_checking=True, state=fit.state))
    assert cb._due(SimpleNamespace(sanity_checking=False, state=SimpleNamespace(fn=TrainerFn.VALIDATING)))


def test_a_curriculum_whose_step_ends_miss_the_validation_grid_fails_at_setup():
    """Samples are taken at each curriculum step's end, so a step that does not end on a validation is refused
    before training (no_pretrain's 2,100-step halves of 4,200 against validation every 200 steps were)."""
    def trainer(*steps: int) -> SimpleNamespace:
        spec = CurriculumSpec([CurriculumStep(name=f"s{i}", mixture={"customized": 1.0}, steps=n)
                               for i, n in enumerate(steps)])
        return SimpleNamespace(callbacks=[CurriculumCallback(spec)], val_check_interval=200)

    sampling = SampleValidation(scope="curriculum")
    sampling.setup(trainer(2000, 2200), None, "fit")  # both ends (2,000 and 4,200) on the grid
    with pytest.raises(ValueError, match=r"steps \[2100\] of this run are not multiples of trainer.val_check_interval"):
        sampling.setup(trainer(2100, 2100), None, "fit")


def test_merged_dataloader_keys():
    merged = merge_task_keys({"val/loss/inpainting": 1.0, "val/loss/grounding": 3.0, "val/x/control": 5.0,
                              "val/x": 4.0, "train/loss_task/control": 2.0, "val/loss/notatask": 7.0})
    assert merged == {"val/loss": 2.0}  # val/x is logged without the task already; train keys stay per task


def test_tensorboard_gets_images_and_tables(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardLogger(tmp_path, name="tb")
    trainer = SimpleNamespace(loggers=[tb, CSVLogger(tmp_path)])  # CSV: files only, nothing to send
    log_image(trainer, "val_samples/editing", np.zeros((8, 12, 3), np.uint8), step=5)
    log_table(trainer, "val_routing/usage", ["task", "expert0"], [["editing", 1.0]], step=5)
    tb.experiment.flush()
    events = EventAccumulator(tb.log_dir, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    image = events.Images("val_samples/editing")[0]
    assert (image.step, image.width, image.height) == (5, 12, 8)
    assert "val_routing/usage/text_summary" in events.Tags()["tensors"]


# ----------------------------------------------------------------------------------------------- a tiny fit
def tiny_module() -> CoLoGenModule:
    torch.manual_seed(0)
    module = CoLoGenModule(preset=TinyPreset(base=None, width=64, heads=2, double_layers=1, single_layers=2),
                           prw=PRWConfig(num_experts=2, rank=4, alpha=8))
    with torch.no_grad():  # routers that actually choose between the two experts
        for p in module.model.expert_parameters() + module.model.router_parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    module.model.activate_next_expert()
    module.model.set_entry_progress(1.0)
    return module


@pytest.mark.timeout(180)
def test_fit_logs_samples_routing_and_metrics_to_wandb_offline_and_files(shapeworld_dir, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    tasks = ["inpainting", "grounding"]
    dm = MixtureDataModule(train_shards=shard_patterns(shapeworld_dir), val_shards=shard_patterns(shapeworld_dir, "val"),
                           mixture={"inpainting": 1.0}, batch_size=4, num_workers=0, batches_per_epoch=3,
                           val_samples_per_task=4, val_tasks=tasks)
    module = tiny_module()
    sampling = SampleValidation(probes_per_task=3, steps=3, seed=0)
    wandb_logger = WandbLogger(project="cologen", save_dir=str(run_dir), offline=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, max_epochs=1, default_root_dir=run_dir, log_every_n_steps=1,
                        logger=[wandb_logger, CSVLogger(run_dir, name="csv")], enable_checkpointing=False,
                        callbacks=[sampling, LearningRateMonitor(), MetricsSummary()], limit_val_batches=1,
                        num_sanity_val_steps=1, enable_progress_bar=False, enable_model_summary=False)
    try:
        trainer.fit(module, datamodule=dm)
        out = run_dir / "validation" / "step000003"
        assert sorted(p.name for p in out.iterdir()) == sorted(
            ["inpainting.png", "grounding.png", "routing.png", "routing_usage.csv", "routing_usage.json",
             "metrics.json", "scores.jsonl"])
        lines = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
        assert [(r["task"], r["index"], r["routing"]) for r in lines] == [
            (t, i, "learned") for t in tasks for i in range(3)]
        assert all("grounding/box_iou" in r for r in lines if r["task"] == "grounding")
        assert not (run_dir / "validation" / "step000000").exists()  # the sanity check does not sample
        width, height = Image.open(out / "grounding.png").size
        assert width == 52 + 3 * 130 + 2 and height > 3 * 130 + 2  # 3 probes x 3 rows, then their prompts

        rows = list(csv.DictReader(open(out / "routing_usage.csv")))
        assert [r["task"] for r in rows] == tasks
        for r in rows:
            assert float(r["expert0"]) + float(r["expert1"]) == pytest.approx(1.0, abs=1e-3)
        metrics = json.loads((out / "metrics.json").read_text())
        for key in ("val_metrics/inpainting/psnr_in", "val_metrics/grounding/box_iou", "sampler/cache_hit_rate",
                    "val_routing/grounding/expert1"):
            assert key in metrics and key in trainer.callback_metrics, key
        assert 0 < metrics["sampler/cache_hit_rate"] < 1  # one source pass per timestep bin, not per step

        # the offline W&B run holds the grids, the heatmap and the usage table as media files
        (offline,) = (run_dir / "wandb").glob("offline-run-*")
        media = offline / "files" / "media"
        for pattern in ("images/val_samples/inpainting_*.png", "images/val_samples/grounding_*.png",
                        "images/val_routing/heatmap_*.png", "table/val_routing/usage_*.table.json"):
            assert list(media.glob(pattern)), pattern
        heatmap = next(media.glob("images/val_routing/heatmap_*.png"))
        assert Image.open(heatmap).size == Image.open(out / "routing.png").size

        # the CSV logger has the learning rates and the sampled metrics; the summary the merged validation loss
        with open(next((run_dir / "csv").glob("version_*/metrics.csv"))) as f:
            columns = next(csv.reader(f))
        assert {"lr-AdamW/experts", "lr-AdamW/routers", "val_metrics/inpainting/psnr_in"} <= set(columns)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["val/loss_task"] == pytest.approx(
            (summary["val/loss_task/inpainting"] + summary["val/loss_task/grounding"]) / 2)
        assert summary["val/loss"] == pytest.approx((summary["val/loss/inpainting"] + summary["val/loss/grounding"]) / 2)
        assert not [key for key in summary if "dataloader_idx" in key]  # one name per value

        # `validate` on the same weights: same probes, same seeds -> the very same images
        again = L.Trainer(accelerator="cpu", default_root_dir=run_dir, logger=False, callbacks=[sampling],
                          limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False)
        results = again.validate(module, datamodule=dm)
        assert "val_metrics/inpainting/psnr_in" in results[0]
        for task in tasks:
            first = np.asarray(Image.open(out / f"{task}.png"))
            second = np.asarray(Image.open(run_dir / "validation" / "step000000" / f"{task}.png"))
            np.testing.assert_array_equal(first, second)
    finally:
        wandb.finish()
