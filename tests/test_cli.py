"""The command line: LightningCLI with omegaconf interpolation across layered configs, and the helper commands."""

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, "-m", "cologen.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_print_config_resolves_interpolations_after_merging_the_stage_file():
    proc = run("fit", "--config", "experiments/tiny/curriculum.yaml", "--config", "experiments/tiny/stage2.yaml",
               "--print_config")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["trainer"]["default_root_dir"] == "runs/tiny/stage2"
    # the checkpoint callback's dirpath follows the stage file's run directory
    ckpt = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("RunCheckpoint"))
    assert ckpt["init_args"]["dirpath"] == "runs/tiny/stage2"
    assert cfg["model"]["init_from"] == "runs/tiny/stage1/last.ckpt"
    assert cfg["curriculum"]["spec"]["run_steps"] == [2]
    assert len(cfg["curriculum"]["spec"]["steps"]) == 5


def test_info_and_export_report_a_missing_checkpoint_in_one_line(tmp_path):
    for command in (["info", str(tmp_path / "none.ckpt")], ["export", str(tmp_path / "none.ckpt"), str(tmp_path)]):
        proc = run(*command)
        assert proc.returncode == 2
        assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
