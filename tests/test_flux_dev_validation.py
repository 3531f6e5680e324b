"""A flux_dev run you can watch (docs/logging.md, "Watching a FLUX run"): experiments/flux_dev/curriculum.yaml as
written (its loggers and callbacks) on the tiny saved FLUX pipeline through the FLUX loader, validating every 2
steps: the offline W&B run holds the grids, the routing heatmap, the per-task validation losses and the throughput
keys, the CSV the same scalars; 2-process DDP and FSDP runs sample without a hang and log media once; the cadence
and the ETA survive an exact resume; the validation's cost at the configs' cadence, computed for FLUX.1-dev."""

from __future__ import annotations

import csv
import itertools
import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from cologen.callbacks import RunThroughput, SampleValidation
from cologen.callbacks.sample_validation import merge_runs, rank_share
from cologen.data import MixtureDataModule
from cologen.eval.probes import ProbeRun
from cologen.model.config import PRWConfig
from cologen.model.presets import TinyPreset
from cologen.module import CoLoGenModule
from cologen.testing.cli import run_fit
from cologen.testing.wandb_records import history
from data_recipes.shapeworld import shard_patterns

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("inpainting", "grounding")
VALIDATIONS = (2, 4)  # val_check_interval 2 over a 4-step curriculum


def _overlay(root: Path, flux: Path, data: Path, strategy: dict | None = None) -> Path:
    """Layered on experiments/flux_dev/curriculum.yaml: the tiny FLUX folder, ShapeWorld at 32 px, validation every
    2 steps, two curriculum steps of 2 optimizer steps; the config's loggers and callbacks stay as they are."""
    trainer = {"default_root_dir": str(root), "accelerator": "cpu", "devices": 1, "val_check_interval": 2,
               "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False}
    if strategy:
        trainer |= {"devices": 2, "num_nodes": 1, "strategy": strategy}
    config = {
        "trainer": trainer,
        "model": {"preset": {"init_args": {"path": str(flux), "text_max_length": 16}},
                  "prw": {"rank": 4, "alpha": 8, "router": {"entry_warmup_steps": 1}}},
        "data": {"class_path": "cologen.data.datamodule.MixtureDataModule", "init_args": {
            "train_shards": {t: str(data / t / "train-*.tar") for t in TASKS},
            "val_shards": {t: str(data / t / "val-*.tar") for t in TASKS},
            "mixture": {"inpainting": 1.0}, "batch_size": 2, "num_workers": 0, "resolution": 32,
            "batches_per_epoch": 100, "shuffle_buffer": 8, "val_samples_per_task": 4, "val_tasks": list(TASKS)}},
        "curriculum": {"spec": {"steps": [
            {"name": "inpainting", "stage": 1, "mixture": {"inpainting": 1.0}, "steps": 2, "lr": 1e-2, "rho": 1.0,
             "alpha": 0.0},
            {"name": "grounding", "stage": 1, "mixture": {"grounding": 1.0}, "steps": 2, "lr": 1e-2, "rho": 0.8,
             "alpha": 0.5}]}},
    }
    path = root.parent / f"{root.name}.yaml"
    root.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(overlay: Path, processes: int = 1, timeout: int = 400):
    offline = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_API_KEY": ""}
    return run_fit("experiments/flux_dev/curriculum.yaml", overlay, processes=processes, env=offline,
                   timeout=timeout)


def _wandb_run(root: Path) -> Path:
    (run,) = (root / "wandb").glob("offline-run-*")  # one W&B run, written by rank zero alone
    return run


def _check_media_once(root: Path) -> None:
    media = _wandb_run(root) / "files" / "media" / "images"
    for task in TASKS:  # one grid per task and validation, not one per rank
        assert len(list(media.glob(f"val_samples/{task}_*.png"))) == len(VALIDATIONS), task
    assert len(list(media.glob("val_routing/heatmap_*.png"))) == len(VALIDATIONS)
    for step in VALIDATIONS:
        out = root / "validation" / f"step{step:06d}"
        assert {f"{t}.png" for t in TASKS} | {"routing.png", "metrics.json", "scores.jsonl"} <= {
            p.name for p in out.iterdir()}
        lines = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
        assert [(r["task"], r["index"]) for r in lines] == [(t, i) for t in TASKS for i in range(4)]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, flux, shapeworld_small):
    root = tmp_path_factory.mktemp("watch") / "runs" / "flux_dev" / "stage1"
    _fit(_overlay(root, flux, shapeworld_small))
    return root


@pytest.mark.timeout(450)
def test_a_flux_dev_run_logs_samples_losses_and_throughput_to_wandb_and_csv(single_run):
    root = single_run
    _check_media_once(root)
    rows = history(next(_wandb_run(root).glob("run-*.wandb")))
    scalars = {k for row in rows for k, v in row.items() if isinstance(v, (int, float)) and not k.startswith("_")}
    expected = {f"val/loss/{t}" for t in TASKS} | {"val/loss"} | {
        f"val_metrics/{t}/{m}" for t in TASKS for m in ("psnr", "ssim", "psnr_out")} | {
        "val_metrics/inpainting/psnr_in", "val_routing/inpainting/own_expert", "val_routing/grounding/expert1",
        "perf/step_seconds", "perf/samples_per_second", "perf/tokens_per_second", "perf/data_wait_fraction",
        "perf/eta_seconds", "train/loss"}
    assert expected <= scalars, sorted(expected - scalars)
    media = {k for row in rows for k, v in row.items() if isinstance(v, dict) and v.get("_type") == "images/separated"}
    assert media == {f"val_samples/{t}" for t in TASKS} | {"val_routing/heatmap"}
    # the per-task losses at both validations: fixed examples, noise and timesteps make them comparable
    steps = sorted({row["trainer/global_step"] for row in rows if "val/loss/inpainting" in row})
    assert len(steps) == len(VALIDATIONS)
    # the CSV keeps the same scalars
    (metrics_csv,) = (root / "logs").glob("version_*/metrics.csv")
    with open(metrics_csv) as f:
        columns = set(next(csv.reader(f)))
    assert scalars - {"trainer/global_step"} <= columns, sorted(scalars - columns)
    # the reference scores of real data, per probe: PSNR/SSIM against the target and outside the region
    scores = [json.loads(line) for line in (root / "validation" / "step000004" / "scores.jsonl").read_text().splitlines()]
    assert all(0 < r["inpainting/psnr_out"] <= 100 for r in scores if r["task"] == "inpainting")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", [
    {"class_path": "cologen.training.strategies.CurriculumDDPStrategy",
     "init_args": {"process_group_backend": "gloo", "find_unused_parameters": True}},
    {"class_path": "cologen.training.fsdp.CoLoGenFSDPStrategy", "init_args": {"process_group_backend": "gloo"}},
], ids=["ddp", "fsdp"])
def test_two_processes_sample_their_share_and_log_once(tmp_path, flux, shapeworld_small, single_run, strategy):
    root = tmp_path / "runs" / "flux_dev" / "stage1"
    _fit(_overlay(root, flux, shapeworld_small, strategy), processes=2, timeout=550)
    _check_media_once(root)
    # the same probes, seeds and weights as on one process: the very same samples' scores, to sampling precision
    for step in VALIDATIONS:
        one = json.loads((single_run / "validation" / f"step{step:06d}" / "metrics.json").read_text())
        two = json.loads((root / "validation" / f"step{step:06d}" / "metrics.json").read_text())
        assert one.keys() == two.keys()
        assert two["val_metrics/inpainting/psnr"] == pytest.approx(one["val_metrics/inpainting/psnr"], abs=0.5)


def test_rank_shares_cover_every_probe_once_and_make_the_same_calls():
    probes = [{"task": "editing", "source": None if i == 4 else torch.zeros(3, 8, 8),
               "target": torch.zeros(3, 8 if i < 3 else 16, 8)} for i in range(5)]
    shares = [rank_share(probes, rank, 2) for rank in range(2)]
    kept = sorted(i for _, ids, keep in shares for i, k in zip(ids, keep) if k)
    assert kept == list(range(5))
    from cologen.eval.probes import probe_group

    groups = [[probe_group(p) for p in share] for share, _, _ in shares]
    assert groups[0] == groups[1]  # the same groups and counts on both ranks: the same model calls
    runs = [(list(ids), ProbeRun("editing", [torch.full((1,), float(i)) for i in ids], [{"x": i} for i in ids]))
            for ids in ([3, 0], [1, 2])]
    merged = merge_runs(runs)
    assert [float(o) for o in merged.outputs] == [0, 1, 2, 3] and [r["x"] for r in merged.rows] == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------------------- resume
def _trainer(root: Path, max_steps: int) -> tuple[L.Trainer, SampleValidation]:
    sampling = SampleValidation(probes_per_task=2, steps=2, seed=0)
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1,
                                  filename="step{step}", auto_insert_metric_name=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, default_root_dir=root, val_check_interval=2,
                        check_val_every_n_epoch=None, limit_val_batches=1, num_sanity_val_steps=0,
                        log_every_n_steps=1, logger=CSVLogger(root, name="csv"), enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[sampling, RunThroughput(every_n_steps=1), checkpoints])
    return trainer, sampling


def _module() -> CoLoGenModule:
    return CoLoGenModule(preset=TinyPreset(base=None), prw=PRWConfig(num_experts=2, rank=4, alpha=8))


def _datamodule(data: Path) -> MixtureDataModule:
    return MixtureDataModule(train_shards=shard_patterns(data), val_shards=shard_patterns(data, "val"),
                             mixture={"inpainting": 1.0}, batch_size=2, num_workers=0, batches_per_epoch=100,
                             val_samples_per_task=2, val_tasks=["inpainting"])


def _csv_rows(root: Path) -> list[dict[str, str]]:
    (path,) = (root / "csv").glob("version_*/metrics.csv")
    return list(csv.DictReader(open(path)))


@pytest.mark.timeout(300)
def test_validation_cadence_and_eta_survive_an_exact_resume(tmp_path, shapeworld_small):
    first = tmp_path / "first"
    trainer, _ = _trainer(first, max_steps=6)
    trainer.fit(_module(), datamodule=_datamodule(shapeworld_small))
    assert sorted(p.name for p in (first / "validation").iterdir()) == ["step000002", "step000004", "step000006"]

    # resume after step 4 (checkpointed before that step's validation ran): no second validation at step 4
    again = tmp_path / "again"
    trainer, _ = _trainer(again, max_steps=6)
    trainer.fit(_module(), datamodule=_datamodule(shapeworld_small), ckpt_path=first / "ckpt" / "step4.ckpt")
    assert sorted(p.name for p in (again / "validation").iterdir()) == ["step000006"]
    # the same validation rows as the uninterrupted run's after step 4 (Lightning logs them at global step - 1)
    validated = [(r["step"], r["val/loss/inpainting"]) for r in _csv_rows(first) if r.get("val/loss/inpainting")]
    assert [(r["step"], r["val/loss/inpainting"]) for r in _csv_rows(again) if r.get("val/loss/inpainting")] == \
        validated[-1:]
    # the ETA counts the steps left from the resumed step: (max_steps - global step) x the step time
    perf = [r for r in _csv_rows(again) if r.get("perf/eta_seconds")]
    assert [int(r["step"]) for r in perf] == [5, 6]
    for r in perf:
        assert float(r["perf/eta_seconds"]) == pytest.approx((6 - int(r["step"])) * float(r["perf/step_seconds"]))


# ------------------------------------------------------------------------------------------------- cost
def test_the_configs_validation_costs_under_five_percent_as_their_comment_says(capsys):
    from benchmarks.validation_cost import main

    costs = main([])
    worst = 100 * max(c.share for c in costs)
    assert worst <= 5.0
    comment = (ROOT / "experiments" / "flux_dev" / "curriculum.yaml").read_text()
    stated = float(re.search(r"at most ([\d.]+)% of training time", comment).group(1))
    assert stated == pytest.approx(round(worst, 2))
    assert f"at most {worst:.2f}%" in capsys.readouterr().out
    for stage in (1, 2, 3):  # every stage validates every 1,000 optimizer steps
        trainer = yaml.safe_load((ROOT / "experiments" / "flux_dev" / f"stage{stage}.yaml").read_text())["trainer"]
        assert trainer["val_check_interval"] == 1000 * trainer["accumulate_grad_batches"]


def test_the_configs_optional_stage_benchmarks_parse_as_cologen_eval_commands(tmp_path):
    from cologen.commands.evaluate import benchmark_args
    from cologen.eval.protocols import PROTOCOLS

    text = (ROOT / "experiments" / "flux_dev" / "curriculum.yaml").read_text()
    lines = text[text.index("    # - class_path: cologen.callbacks.StageEndBenchmark"):].splitlines()
    block = [line.replace("# ", "", 1) for line in itertools.takewhile(lambda x: x.startswith("    # "), lines)]
    (callback,) = yaml.safe_load("\n".join(block))
    benchmarks = callback["init_args"]["benchmarks"]
    assert set(benchmarks) == {"control", "customized", "editing"}
    for step, command in benchmarks.items():
        args = benchmark_args(command, tmp_path, limit=64)
        assert PROTOCOLS[args.protocol].task == step and args.limit == 64
