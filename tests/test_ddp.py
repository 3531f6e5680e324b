"""Two-process CPU DDP (gloo) through the CLI and Lightning's own launcher: the tiny curriculum config shortened to
two curriculum steps of two optimizer steps; both ranks train, hold identical weights after every step, freeze the
veteran and agree on the curriculum step; the checkpoint says where the curriculum stands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cologen.training.replicas import read_reports

ROOT = Path(__file__).resolve().parents[1]


def _overlay(root: Path, data: Path) -> Path:
    """Layered on experiments/tiny/curriculum.yaml: two processes, tiny data, a two-step curriculum."""
    config = {
        "trainer": {
            "default_root_dir": str(root), "devices": 2,
            "strategy": {"class_path": "cologen.training.strategies.CurriculumDDPStrategy",
                         "init_args": {"process_group_backend": "gloo"}},
            "log_every_n_steps": 1, "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
            "callbacks": [
                {"class_path": "cologen.training.run_checkpoint.RunCheckpoint",
                 "init_args": {"dirpath": str(root), "save_last": True, "every_n_train_steps": 1000}},
                {"class_path": "cologen.training.replicas.ReplicaReport",
                 "init_args": {"dirpath": str(root / "replicas"), "include_base": True}}]},
        "model": {"preset": {"class_path": "cologen.model.presets.TinyPreset", "init_args": {"base": None}},
                  "prw": {"router": {"entry_warmup_steps": 1}}},
        "data": {"init_args": {
            "train_shards": {t: str(data / t / "train-*.tar") for t in ("inpainting", "grounding")},
            "val_shards": {}, "val_tasks": None, "batch_size": 2, "num_workers": 0, "shuffle_buffer": 8}},
        "curriculum": {"spec": {"steps": [
            {"name": "inpainting", "stage": 1, "mixture": {"inpainting": 1.0}, "steps": 2, "lr": 1e-2, "rho": 1.0,
             "alpha": 0.0},
            {"name": "grounding", "stage": 1, "mixture": {"grounding": 1.0}, "steps": 2, "lr": 1e-2, "rho": 0.8,
             "alpha": 0.5}]}},
    }
    path = root.parent / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.timeout(300)
def test_two_cpu_processes_train_the_curriculum_in_lockstep(shapeworld_small, tmp_path):
    root = tmp_path / "run"
    cmd = [sys.executable, "-m", "cologen.cli", "fit", "--config", "experiments/tiny/curriculum.yaml",
           "--config", str(_overlay(root, shapeworld_small))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = proc.stdout + proc.stderr
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in out and "GLOBAL_RANK: 1, MEMBER: 2/2" in out
    assert "curriculum: enter step 1 'grounding'" in proc.stdout

    reports = read_reports(root / "replicas")
    assert sorted(reports) == [0, 1]
    assert reports[0] == reports[1]  # identical trainable weights (and routing state) after every step
    records = reports[0]
    assert [(r["global_step"], r["curriculum_step"], r["trainable"]) for r in records] == [
        (1, 0, [0]), (2, 0, [0]), (3, 1, [1]), (4, 1, [1])]
    assert len({r["base"] for r in records}) == 1
    assert records[0]["experts"][0] != records[1]["experts"][0]  # both ranks trained expert 0 ...
    assert records[1]["experts"][0] == records[3]["experts"][0]  # ... which then stays frozen
    assert records[3]["experts"][1] != records[2]["experts"][1]  # expert 1 trains
    assert records[2]["routers"] != records[3]["routers"]

    info = subprocess.run([sys.executable, "-m", "cologen.cli", "info", str(root / "last.ckpt")], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    summary = json.loads(info.stdout)
    assert summary["global_step"] == 4
    assert summary["curriculum"]["step"] == 1 and summary["curriculum"]["steps_done_in_step"] == 2
    assert summary["experts"]["active"] == [0, 1] and summary["experts"]["frozen"] == [0]
