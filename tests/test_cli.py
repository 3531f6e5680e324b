"""The command line: LightningCLI with omegaconf interpolation across layered configs, the helper commands, and
one-line errors that name the fix (exit status 2, nothing created) for configs, data, checkpoints and FLUX paths.

Most commands run in this process through `cologen.cli.main` (what the console script calls); stderr is read at
the file-descriptor level, so Lightning's and transformers' own output would show too."""

import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from cologen import checkpoints
from cologen.testing.cli import run_in_process as cologen

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments" / "tiny"


def run(*args):
    return subprocess.run([sys.executable, "-m", "cologen.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


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
    assert "LightningCLI's args parameter" not in proc.stderr  # the console script gives LightningCLI no args


def test_the_gpu_base_config_is_base_yamls_recipe_with_more_samples_on_a_gpu():
    """make base-gpu layers base_gpu.yaml after base.yaml: the same model and tasks from random weights, on a GPU in
    bf16, its learning-rate horizon the run's length and its EMA started after the warm-up."""
    proc = run("fit", "--config", "experiments/tiny/curriculum.yaml", "--config", "experiments/tiny/base.yaml",
               "--config", "experiments/tiny/base_gpu.yaml", "--print_config")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = yaml.safe_load(proc.stdout)
    base = yaml.safe_load((TINY / "base.yaml").read_text())
    trainer, model, data = cfg["trainer"], cfg["model"], cfg["data"]["init_args"]
    assert (trainer["accelerator"], trainer["precision"]) == ("gpu", "bf16-mixed")
    assert model["preset"]["init_args"]["base"] is None and model["train_base"] and model["prw"]["num_experts"] == 0
    assert set(data["train_shards"]) == {"t2i", "reconstruct"} and data["mixture"] == base["data"]["init_args"]["mixture"]
    assert all("shapeworld_base_large" in v for v in data["train_shards"].values())
    samples = trainer["max_steps"] * data["batch_size"]
    assert samples >= 20 * base["trainer"]["max_steps"] * base["data"]["init_args"]["batch_size"]
    assert model["optim"]["total_steps"] == trainer["max_steps"]
    ema = next(c["init_args"] for c in trainer["callbacks"] if c["class_path"].endswith("EMAWeightAveraging"))
    assert model["optim"]["warmup_steps"] < ema["update_starting_at_step"] < trainer["max_steps"]
    ckpt = next(c["init_args"] for c in trainer["callbacks"] if c["class_path"].endswith("RunCheckpoint"))
    assert ckpt["dirpath"] == trainer["default_root_dir"] == "runs/tiny/base_gpu" and ckpt["save_last"]


def test_help_lists_every_command(capfd):
    from lightning.pytorch.cli import LightningCLI

    from cologen.cli import COMMANDS

    code, out, err = cologen(capfd, "--help")
    assert code == 0 and not err
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and line.split()]
    assert {"fit", "validate", "test", "predict", "info", "export", "eval"} <= set(listed)
    assert set(LightningCLI.subcommands()) <= set(COMMANDS)  # a new Lightning subcommand would be listed too
    code, out, err = cologen(capfd, "evall", "x.ckpt")
    assert code == 2 and "did you mean eval?" in one_line(err)


@pytest.mark.parametrize("text, expected", [
    ("model:\n  prw:\n    rankk: 4\n", "unknown key model.prw.rankk (did you mean model.prw.rank?)"),
    ("model:\n  prw:\n    rank: big\n", "model.prw.rank expects int, got 'big'"),
    ("model:\n  prw:\n    router:\n      temprature: 2\n",
     "unknown key model.prw.router.temprature (did you mean model.prw.router.temperature?)"),
    ("modle:\n  prw: {}\n", "unknown key modle (did you mean model?)"),
    ("trainer:\n  max_stepz: 3\n", "unknown key trainer.max_stepz (did you mean trainer.max_steps?)"),
    ("data:\n  init_args:\n    batch_sise: 3\n",
     "unknown key data.init_args.batch_sise (did you mean data.init_args.batch_size?)"),
    ("curriculum:\n  spec:\n    stepz: []\n", "unknown key curriculum.spec.stepz (did you mean curriculum.spec.steps?)"),
])
def test_a_config_mistake_is_one_line_naming_file_key_and_the_closest_key(capfd, tmp_path, text, expected):
    bad = tmp_path / "mine.yaml"
    bad.write_text(text)
    code, out, err = cologen(capfd, "fit", "--config", TINY / "curriculum.yaml", "--config", bad,
                             "--trainer.default_root_dir", tmp_path / "run")
    assert code == 2
    assert one_line(err) == f"cologen fit: {bad}: {expected}"
    assert not (tmp_path / "run").exists()


def test_a_command_line_mistake_names_the_command_line(capfd, tmp_path):
    code, _, err = cologen(capfd, "fit", "--config", TINY / "curriculum.yaml", "--model.prw.rnk", "3")
    assert code == 2
    assert one_line(err) == "cologen fit: the command line: unknown key model.prw.rnk (did you mean model.prw.rank?)"


def test_missing_data_names_the_pattern_and_the_command_and_creates_nothing(capfd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/shapeworld here
    code, out, err = cologen(capfd, "fit", "--config", TINY / "curriculum.yaml", "--config", TINY / "stage1.yaml")
    assert code == 2
    assert one_line(err) == ("cologen fit: data.train_shards.inpainting: no shards match "
                             "'data/shapeworld/inpainting/train-*.tar': run `make data` (ShapeWorld)")
    assert list(tmp_path.iterdir()) == []  # no run folder, no W&B run, no logs


# ---------------------------------------------------------------------------------------------- checkpoints
def tiny_module():
    from cologen.model.config import PRWConfig
    from cologen.model.presets import TinyPreset
    from cologen.module import CoLoGenModule

    torch.manual_seed(0)
    return CoLoGenModule(preset=TinyPreset(base=None, width=32, heads=2, double_layers=1, single_layers=1),
                         prw=PRWConfig(num_experts=2, rank=4, alpha=8))


def batches(n=2):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        t = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
        out.append({"target": t, "source": t.flip(-1), "has_source": torch.ones(2, dtype=torch.bool),
                    "prompt": ["flip it", "turn it"], "task": ["editing", "editing"]})
    return out


class Batches(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(batches(), batch_size=None)


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    """A real cologen checkpoint and every way a file can fail to be one."""
    folder = tmp_path_factory.mktemp("ckpts")
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=folder)
    trainer.fit(tiny_module(), datamodule=Batches())
    good = folder / "good.ckpt"
    trainer.save_checkpoint(good)
    data = good.read_bytes()
    (folder / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    with zipfile.ZipFile(good) as archive:  # a byte inside the largest tensor: torch.load alone loads it silently
        record = max(archive.infolist(), key=lambda i: i.file_size)
    with open(good, "rb") as f:
        f.seek(record.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    flipped = bytearray(data)
    flipped[record.header_offset + 30 + name_len + extra_len + record.file_size // 2] ^= 0x10
    (folder / "bitflip.ckpt").write_bytes(bytes(flipped))
    (folder / "junk.ckpt").write_bytes(bytes(range(256)) * 20)
    shutil.copy(ROOT / "README.md", folder / "README.md")
    (folder / "run").mkdir()
    shutil.copy(good, folder / "run" / "last.ckpt")
    torch.save({"state_dict": {}, "epoch": 0}, folder / "lightning.ckpt")  # a checkpoint, not cologen's
    return folder


BAD = {"truncated.ckpt": "not a torch archive", "bitflip.ckpt": "fails its CRC check",
       "junk.ckpt": "not a torch archive", "README.md": "not a torch archive",
       "run": "it is a directory: give a file inside it, e.g.", "missing.ckpt": "the file does not exist",
       "lightning.ckpt": "no 'cologen' section"}


def test_a_real_checkpoint_passes_the_check(bad_checkpoints):
    ckpt = checkpoints.check(bad_checkpoints / "good.ckpt")
    assert ckpt["cologen"]["num_active"] == 1


@pytest.mark.parametrize("name", list(BAD))
def test_every_command_says_not_a_cologen_checkpoint_in_one_line(capfd, bad_checkpoints, name, tmp_path):
    path = bad_checkpoints / name
    commands = {
        "info": ["info", path],
        "export": ["export", path, tmp_path / "out"],
        "eval": ["eval", "shapeworld", "--ckpt", path, "--data", bad_checkpoints],  # read before the data
        "demo": ["demo", path],  # checked before anything is served
        "predict": ["predict", "--config", TINY / "curriculum.yaml", "--config", TINY / "predict.yaml",
                    "--ckpt_path", path],
        "fit": ["fit", "--config", TINY / "curriculum.yaml", "--ckpt_path", path,
                "--trainer.default_root_dir", tmp_path / "run"],
    }
    for command, args in commands.items():
        code, out, err = cologen(capfd, *args)
        assert code == 2, (command, err[-2000:])
        assert one_line(err) .startswith(f"cologen {command}: {path} is not a cologen checkpoint ("), (command, err)
        assert BAD[name] in err, (command, err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ FLUX path
def test_flux_dev_without_flux_names_flux_path_and_the_folder(capfd, tmp_path):
    proc = subprocess.run(["make", "-s", "stage1", "PRESET=flux_dev", f"FLUX_PATH={tmp_path / 'none'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert f"FLUX_PATH={tmp_path / 'none'} is not a FLUX.1 diffusers folder" in line
    assert "model_index.json, transformer/, vae/" in line

    flux = ROOT / "experiments" / "flux_dev"
    code, out, err = cologen(capfd, "fit", "--config", flux / "curriculum.yaml", "--config",
                             flux / "data_stage1.yaml", "--config", flux / "stage1.yaml",
                             "--model.preset.init_args.path", tmp_path / "none",
                             "--trainer.default_root_dir", tmp_path / "run")
    assert code == 2
    assert one_line(err).startswith(f"cologen fit: no FLUX.1 folder at {tmp_path / 'none'}: set FLUX_PATH (make) "
                                    "or model.preset.init_args.path")
    assert not (tmp_path / "run").exists()
