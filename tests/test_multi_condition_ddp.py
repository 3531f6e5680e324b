"""Mixed condition counts under 2-process CPU DDP (gloo): a curriculum step that mixes the two-condition
customized_layout with one-condition inpainting trains in lockstep on both ranks, and an exact resume in the middle
of that step replays the run (docs/multi_condition.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from cologen.testing.cli import run_fit
from cologen.training.replicas import read_reports


def _overlay(root: Path, data: Path) -> Path:
    config = {
        "trainer": {
            "default_root_dir": str(root), "devices": 2,
            "strategy": {"class_path": "cologen.training.strategies.CurriculumDDPStrategy",
                         "init_args": {"process_group_backend": "gloo", "find_unused_parameters": True}},
            "log_every_n_steps": 1, "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
            "callbacks": [
                {"class_path": "cologen.training.run_checkpoint.RunCheckpoint",
                 "init_args": {"dirpath": str(root), "filename": "step{step}", "auto_insert_metric_name": False,
                               "save_last": True, "every_n_train_steps": 1, "save_top_k": -1}},
                {"class_path": "cologen.training.replicas.ReplicaReport",
                 "init_args": {"dirpath": str(root / "replicas"), "include_base": False}}]},
        "model": {"preset": {"class_path": "cologen.model.presets.TinyPreset", "init_args": {"base": None}},
                  "prw": {"num_experts": 2, "router": {"entry_warmup_steps": 1}}},
        "data": {"init_args": {
            "train_shards": {"inpainting": str(data / "inpainting" / "train-*.tar"),
                             "customized_layout": str(data / "customized" / "train-*.tar")},
            "val_shards": {}, "val_tasks": None, "batch_size": 2, "num_workers": 0, "shuffle_buffer": 8}},
        "curriculum": {"spec": {"steps": [
            {"name": "inpainting", "stage": 1, "mixture": {"inpainting": 1.0}, "steps": 2, "lr": 1e-2, "rho": 1.0,
             "alpha": 0.0},
            {"name": "customized_layout", "stage": 2, "mixture": {"customized_layout": 0.5, "inpainting": 0.5},
             "steps": 3, "lr": 1e-2, "rho": 0.8, "alpha": 0.5}]}},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root.parent / f"{root.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(config: Path, *extra: str):
    return run_fit("experiments/tiny/curriculum.yaml", config, extra=extra)


@pytest.mark.timeout(600)
def test_mixed_condition_counts_train_in_lockstep_and_resume_exactly(shapeworld_dir, tmp_path):
    root = tmp_path / "run"
    proc = _fit(_overlay(root, shapeworld_dir))
    assert "curriculum: enter step 1 'customized_layout'" in proc.stdout + proc.stderr
    reports = read_reports(root / "replicas")
    assert sorted(reports) == [0, 1] and reports[0] == reports[1]  # the same weights on both ranks, every step
    assert [r["global_step"] for r in reports[0]] == [1, 2, 3, 4, 5]

    start = tmp_path / "step4.ckpt"  # the middle of the two-condition step
    shutil.copy(root / "step4.ckpt", start)
    again = tmp_path / "again"
    _fit(_overlay(again, shapeworld_dir), "--ckpt_path", str(start))
    resumed = read_reports(again / "replicas")
    assert resumed[0] == resumed[1] and resumed[0][-1] == reports[0][-1]  # step 5 exactly as the first run's
