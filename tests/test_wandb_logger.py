"""RunWandbLogger: online when logged in, offline otherwise; named and grouped by the run folder."""

import pytest

from cologen.training.wandb_logger import RunWandbLogger, run_name, wandb_logged_in, wandb_mode


def test_mode_follows_the_users_login(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not wandb_logged_in() and wandb_mode() == "offline"  # no key, no netrc
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    (tmp_path / "netrc").chmod(0o600)
    assert wandb_logged_in() and wandb_mode() == "online"  # what `wandb login` writes
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"  # the user's choice wins
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / "netrc").write_text("machine example.com login a password b\n")
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert wandb_mode() == "online"


@pytest.mark.parametrize("folder, expected", [
    ("runs/flux_dev/stage2", ("flux_dev/stage2", "flux_dev")),
    ("/data/me/cologen/runs/flux_dev/stage1", ("flux_dev/stage1", "flux_dev")),
    ("/scratch/exp7/stage3", ("exp7/stage3", "exp7")),
])
def test_name_and_group_come_from_the_run_folder(folder, expected):
    assert run_name(folder) == expected


def test_an_offline_run_carries_the_stage_name_and_group(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = RunWandbLogger(save_dir=str(tmp_path / "runs" / "flux_dev" / "stage2"))
    try:
        run = logger.experiment
        assert (run.name, run.group) == ("flux_dev/stage2", "flux_dev") and run.settings.mode in ("offline", "dryrun")  # W&B calls offline "dryrun" internally
    finally:
        logger.experiment.finish()
