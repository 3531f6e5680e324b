"""`cologen fit | validate | predict | export | info` end to end on the tiny preset's model (small data, a three-step
curriculum of 2 optimizer steps each): what a user sees and where the files go.

- a fit through the console entry point prints a progress bar over the run's curriculum steps and none of the known
  Lightning messages;
- resuming a finished run says so and exits 0, creating nothing;
- a stage started from an earlier stage (relative `model.init_from`) leaves a self-contained checkpoint: copied
  alone into an empty folder and used from another working directory (where the relative path holds junk), it
  exports, predicts and is summarised;
- `cologen validate` writes into its own folder, named after the checkpoint and its step.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cologen.testing.cli import run_in_process as cologen

ROOT = Path(__file__).resolve().parents[1]
CURRICULUM = ROOT / "experiments" / "tiny" / "curriculum.yaml"
TASKS = ["inpainting", "grounding", "control", "customized", "editing"]


def small_config(run_dir: str, shapeworld: Path) -> dict:
    """Layered on the tiny curriculum: three curriculum steps of 2 optimizer steps, 3-batch epochs, 2 probes."""
    return {
        "trainer": {
            "default_root_dir": run_dir, "val_check_interval": 2, "limit_val_batches": 1, "log_every_n_steps": 1,
            "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                        "init_args": {"save_dir": "${trainer.default_root_dir}", "name": "logs"}}],
            "callbacks": [
                {"class_path": "cologen.training.run_checkpoint.RunCheckpoint",
                 "init_args": {"dirpath": "${trainer.default_root_dir}", "filename": "step{step:06d}",
                               "auto_insert_metric_name": False, "save_last": True, "every_n_train_steps": 2}},
                {"class_path": "cologen.callbacks.SampleValidation",
                 "init_args": {"probes_per_task": 2, "steps": 2, "scope": "curriculum"}},
                {"class_path": "cologen.callbacks.MetricsSummary"}]},
        "model": {"prw": {"router": {"entry_warmup_steps": 1}}},
        "data": {"init_args": {
            "train_shards": {t: str(shapeworld / t / "train-*.tar") for t in TASKS},
            "val_shards": {t: str(shapeworld / t / "val-*.tar") for t in TASKS},
            "batch_size": 2, "val_batch_size": 2, "num_workers": 0, "batches_per_epoch": 3,
            "val_samples_per_task": 2, "val_tasks": ["inpainting", "grounding", "control"]}},
        "curriculum": {"spec": {"run_steps": [0, 1], "steps": [
            {"name": t, "stage": 1 + i // 2, "mixture": {t: 1.0}, "steps": 2, "lr": 1e-3,
             "rho": 1.0 if i == 0 else 0.8, "alpha": 0.0 if i == 0 else 0.5}
            for i, t in enumerate(TASKS[:3])]}},
    }


@pytest.fixture(scope="module")
def stage_a(tmp_path_factory, shapeworld_dir):
    """Curriculum steps 0-1 through the console entry point (a new interpreter, as a user runs it)."""
    folder = tmp_path_factory.mktemp("runs")
    config = folder / "small.yaml"
    config.write_text(yaml.safe_dump(small_config(str(folder / "stage_a"), shapeworld_dir)))
    proc = subprocess.run([sys.executable, "-m", "cologen.cli", "fit", "--config", str(CURRICULUM), "--config",
                           str(config)], cwd=folder, capture_output=True, text=True, timeout=3600)
    return folder, config, proc


@pytest.mark.timeout(3600)
def test_a_fit_shows_the_runs_progress_and_none_of_the_known_messages(stage_a):
    folder, _, proc = stage_a
    assert proc.returncode == 0, proc.stderr[-4000:]
    both = proc.stdout + proc.stderr
    assert "4/4" in both  # one bar over the run's 2 + 2 optimizer steps (its epochs are 3 batches)
    assert "grounding (curriculum step 1, 2 of 2 in this run)" in both
    assert "Epoch 0" not in both and "Epoch 1" not in both
    for noise in ("module(s) in eval mode", "LightningCLI's args parameter", "Tip:", "Seed set to",
                  "`max_epochs` was not set", "Loading weights"):
        assert noise not in both, noise
    run = folder / "stage_a"
    # each curriculum step's end samples that step's own task (validation scope: curriculum)
    assert (run / "last.ckpt").is_file() and (run / "validation" / "step000002" / "inpainting.png").is_file()
    assert (run / "validation" / "step000004" / "grounding.png").is_file()


@pytest.mark.timeout(3600)
def test_resuming_a_finished_run_says_so_and_exits_0(stage_a, capfd, monkeypatch):
    folder, config, _ = stage_a
    monkeypatch.chdir(folder)
    run = folder / "stage_a"
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    code, out, err = cologen(capfd, "fit", "--config", CURRICULUM, "--config", config,
                             "--ckpt_path", run / "last.ckpt")
    assert code == 0, err[-3000:]
    assert f"{run / 'last.ckpt'} has already finished this run (curriculum steps 0 inpainting, 1 grounding; " \
           "4 optimizer steps): nothing to resume" in out
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # no new logs, checkpoints or samples


@pytest.mark.timeout(3600)
def test_a_stage_checkpoint_works_alone_from_anywhere(stage_a, capfd, monkeypatch, tmp_path):
    folder, config, _ = stage_a
    monkeypatch.chdir(folder)
    stage_b = {"trainer": {"default_root_dir": str(folder / "stage_b")},
               "model": {"init_from": "stage_a/last.ckpt"},  # relative, as the stage files write it
               "curriculum": {"spec": {"run_steps": [2]}}}
    (folder / "stage_b.yaml").write_text(yaml.safe_dump(stage_b))
    code, out, err = cologen(capfd, "fit", "--config", CURRICULUM, "--config", config, "--config",
                             folder / "stage_b.yaml")
    assert code == 0, err[-3000:]

    alone = tmp_path / "store" / "stage_b.ckpt"
    alone.parent.mkdir()
    shutil.copy(folder / "stage_b" / "last.ckpt", alone)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "stage_a").mkdir(parents=True)
    (elsewhere / "stage_a" / "last.ckpt").write_text("not a checkpoint: loading must never read init_from")
    monkeypatch.chdir(elsewhere)

    code, out, err = cologen(capfd, "info", alone)
    assert code == 0, err
    info = json.loads(out)
    assert info["curriculum"]["step"] == 2 and info["experts"]["active"] == [0, 1, 2]

    code, out, err = cologen(capfd, "export", alone, tmp_path / "exported")
    assert code == 0, err[-3000:]
    assert (tmp_path / "exported" / "prw_adapters.safetensors").is_file()

    requests = tmp_path / "requests.jsonl"
    shutil.copy(ROOT / "examples" / "grounding_source.png", tmp_path / "scene.png")
    requests.write_text(json.dumps({"id": "a", "task": "grounding", "prompt": "draw a box around the circle",
                                    "source": "scene.png", "steps": 2}) + "\n")
    code, out, err = cologen(capfd, "predict", "--config", CURRICULUM, "--config",
                             ROOT / "experiments" / "tiny" / "predict.yaml", "--ckpt_path", alone,
                             "--data.requests", requests)
    assert code == 0, err[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "requests_outputs" / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok"]


@pytest.mark.timeout(3600)
def test_validate_writes_into_a_folder_of_its_own(stage_a, capfd, monkeypatch):
    folder, config, _ = stage_a
    monkeypatch.chdir(folder)
    run = folder / "stage_a"
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    code, out, err = cologen(capfd, "validate", "--config", CURRICULUM, "--config", config,
                             "--ckpt_path", run / "last.ckpt")
    assert code == 0, err[-3000:]
    own = run / "validate" / "last"
    assert (own / "config.yaml").is_file()
    assert (own / "validation" / "step000004" / "grounding.png").is_file()  # named after the checkpoint's step
    assert list((own / "logs").glob("version_*/metrics.csv"))
    after = sorted(p.relative_to(run) for p in run.rglob("*") if not p.is_relative_to(run / "validate"))
    assert after == [p for p in before]  # the training run's files are untouched
