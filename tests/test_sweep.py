"""The gate-temperature sweep: W&B's validation of the sweep file, the agent's command line, and one trial proposed
by W&B's sweep engine run locally (offline W&B run) for a few steps on tiny data."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from cologen.sweep import (
    Trial,
    agent_command,
    format_table,
    load_sweep,
    planned_trials,
    progress_line,
    run_local,
    server_reachable,
    trial_fingerprint,
    validate_sweep,
)

REPO = Path(__file__).resolve().parent.parent
SWEEP = REPO / "experiments" / "sweeps" / "gate_temperature.yaml"


def test_sweep_file_passes_wandb_validation_and_proposes_the_grid():
    import sweeps

    config = load_sweep(SWEEP)
    assert sweeps.schema_violations_from_proposed_config(config) == []
    assert set(config["parameters"]) == {"model.prw.router.temperature", "model.veteran.rho"}
    first = sweeps.next_run(config, [], validate=True)
    assert first.config == {"model.prw.router.temperature": {"value": 0.5}, "model.veteran.rho": {"value": 0.6}}
    with pytest.raises(ValueError, match="grud"):
        validate_sweep({**config, "method": "grud"})
    with pytest.raises(ValueError, match="metric.name"):
        validate_sweep({k: v for k, v in config.items() if k != "metric"})


def test_progress_says_trial_k_of_n_with_an_eta():
    config = load_sweep(SWEEP)
    grid = 1
    for spec in config["parameters"].values():
        grid *= len(spec["values"])
    assert planned_trials(config, None) == grid and planned_trials(config, 3) == 3
    assert planned_trials({**config, "method": "random"}, None) is None
    params = {"model.prw.router.temperature": 0.5, "model.veteran.rho": 0.8}
    assert progress_line(1, 6, [], params) == ("[sweep] trial 1/6 (ETA after the first trial): "
                                               "model.prw.router.temperature=0.5, model.veteran.rho=0.8")
    # 4 trials left (this one included) at the mean of the finished ones (100 s and 140 s)
    assert progress_line(3, 6, [100.0, 140.0], params).startswith(
        "[sweep] trial 3/6 (ETA 8 min for 4 trial(s) at 2 min each): ")
    assert progress_line(2, None, [60.0], params).startswith("[sweep] trial 2: ")


def test_command_line_is_the_agents(tmp_path, monkeypatch):
    """Our formatting against the agent's own `_command_run` (its subprocess replaced by a recorder)."""
    from wandb import wandb_agent

    config = load_sweep(SWEEP)
    args = {"model.prw.router.temperature": {"value": 2.0}, "model.veteran.rho": {"value": 0.8}}
    started: list[list[str]] = []

    class Recorder:
        def __init__(self, command=None, **kwargs):
            started.append(command)

    monkeypatch.setattr(wandb_agent, "AgentProcess", Recorder)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")
    monkeypatch.setenv("WANDB_RUN_ID", "before")  # the agent sets it; monkeypatch restores it
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id="sw1")
    agent._sweep_command = list(config["command"])
    agent._command_run({"args": args, "program": config["program"], "run_id": "abc123"})
    json_file = str(tmp_path / "wandb" / "sweep-sw1" / "config-abc123.json")
    assert started == [agent_command(config, args, json_file)]
    assert started[0] == ["/usr/bin/env", "cologen", "fit", "--config", "experiments/tiny/curriculum.yaml",
                          "--config", "experiments/sweeps/gate_temperature_trial.yaml",
                          "--model.prw.router.temperature=2.0", "--model.veteran.rho=0.8"]


def test_no_server_without_an_api_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert server_reachable(timeout=0.5) is False


@pytest.mark.timeout(400)
def test_local_trials_run_report_their_metric_and_routing_and_resume(shapeworld_dir, tmp_path, monkeypatch, capsys):
    """Trials exactly as the agent would start them, plus one more --config that shrinks them to 2 + 2 steps on the
    tiny test data (the shortened curriculum keeps the control step's rho tied to model.veteran.rho); the table
    and the plot carry the metric and the routing statistics; a rerun resumes after the finished trials."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    tasks = ("inpainting", "control")
    shrink = {
        "trainer": {"default_root_dir": str(tmp_path / "trial" / "${oc.env:WANDB_RUN_ID,manual}"),
                    "val_check_interval": 2, "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"preset": {"init_args": {"base": None, "width": 64, "heads": 2, "double_layers": 1,
                                           "single_layers": 2}},
                  "prw": {"rank": 4, "alpha": 8, "router": {"entry_warmup_steps": 1}}},
        "data": {"init_args": {
            "train_shards": {t: str(shapeworld_dir / t / "train-*.tar") for t in tasks},
            "val_shards": {t: str(shapeworld_dir / t / "val-*.tar") for t in tasks},
            "batch_size": 4, "num_workers": 0, "val_samples_per_task": 4, "val_batch_size": 4}},
        "curriculum": {"spec": {"steps": [
            {"name": "inpainting", "mixture": {"inpainting": 1.0}, "steps": 2, "rho": 1.0, "alpha": 0.0},
            {"name": "control", "mixture": {"control": 1.0}, "steps": 2, "rho": "${model.veteran.rho}",
             "alpha": 0.5}]}},
    }
    (tmp_path / "shrink.yaml").write_text(yaml.safe_dump(shrink))
    config = load_sweep(SWEEP)
    report = ["val_routing/control/expert1", "val/routing_entropy"]
    out = tmp_path / "sweep"
    (trial,) = run_local(config, 1, out, ["--config", str(tmp_path / "shrink.yaml")], cwd=REPO, report=report)
    assert "[sweep] trial 1/1 (ETA after the first trial): model.prw.router.temperature=0.5" in capsys.readouterr().out

    assert trial.returncode == 0
    assert trial.command[:9] == agent_command(config, {k: {"value": v} for k, v in trial.params.items()},
                                             str(out / f"{trial.run_id}.args.json"))
    metric = trial.metric("val_metrics/control/ssim")
    assert math.isfinite(metric)
    assert trial.summary["trainer/global_step"] == 4
    assert 0 <= trial.metric("val_routing/control/expert1") <= 1 and math.isfinite(trial.metric("val/routing_entropy"))
    # the sweep's values reached the model and the curriculum
    resolved = yaml.safe_load((tmp_path / "trial" / trial.run_id / "config.yaml").read_text())
    assert resolved["model"]["prw"]["router"]["temperature"] == 0.5
    assert resolved["curriculum"]["spec"]["steps"][1]["rho"] == 0.6
    # an offline W&B run under the trial's run id, with the sweep's parameters in its config
    assert list((tmp_path / "trial" / trial.run_id / "wandb").glob(f"offline-run-*-{trial.run_id}"))
    params = yaml.safe_load((out / f"{trial.run_id}.params.yaml").read_text())
    assert params["model.veteran.rho"] == {"value": 0.6}
    rows = (out / "trials.csv").read_text().splitlines()
    assert rows[0].split(",") == ["run_id", "model.prw.router.temperature", "model.veteran.rho",
                                  "val_metrics/control/ssim", *report, "exit", "seconds"]
    assert rows[1].startswith(trial.run_id) and json.loads(rows[1].split(",")[3]) == pytest.approx(metric, 1e-5)
    assert trial.run_id in format_table([trial], config, report)
    assert (out / "trials.png").stat().st_size > 0

    # a rerun resumes: the finished trial is not run again, the next grid point is
    done = run_local(config, 2, out, ["--config", str(tmp_path / "shrink.yaml")], cwd=REPO, report=report)
    printed = capsys.readouterr().out
    assert "[sweep] resuming: 1 of 2 trial(s) finished" in printed and "[sweep] trial 2/2 (ETA " in printed
    assert [t.run_id for t in done][0] == trial.run_id and len(done) == 2
    assert done[1].params == {"model.prw.router.temperature": 0.5, "model.veteran.rho": 0.8}
    assert len((out / "trials.csv").read_text().splitlines()) == 3


def test_the_shipped_trial_is_long_enough_for_the_newest_expert_to_be_routed():
    """The old 40-step trials ended before the 50-step entry anneal: the newest expert was chosen once in 1920
    decisions and both rho values gave identical losses. The spec check now refuses such a trial."""
    trial = yaml.safe_load((REPO / "experiments" / "sweeps" / "gate_temperature_trial.yaml").read_text())
    tiny = yaml.safe_load((REPO / "experiments" / "tiny" / "curriculum.yaml").read_text())
    warmup = tiny["model"]["prw"]["router"]["entry_warmup_steps"]
    steps = trial["curriculum"]["spec"]["steps"]
    assert all(s["steps"] >= 2 * warmup for s in steps[1:])
    assert trial["trainer"]["callbacks"][1]["init_args"]["probes_per_task"] >= 32
    from cologen.curriculum.spec import CurriculumSpec, CurriculumStep

    short = CurriculumSpec([CurriculumStep("a", {"inpainting": 1.0}, 40), CurriculumStep("b", {"control": 1.0}, 40)])
    with pytest.raises(ValueError, match="entry_warmup_steps"):
        short.validate(num_experts=5, entry_warmup_steps=warmup)


def test_a_resume_after_the_trial_config_changed_starts_afresh(tmp_path, capsys):
    """Trials recorded under another configuration (here: a --config file whose settings changed since) are not
    taken for this sweep's: the record is moved aside and the grid starts again; an unchanged one resumes."""
    config = load_sweep(SWEEP)
    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  prw:\n    rank: 4\n")
    out = tmp_path / "sweep"
    out.mkdir()
    before = trial_fingerprint(config, ["--config", str(extra)], REPO)
    trial = Trial("abc", {"model.prw.router.temperature": 0.5, "model.veteran.rho": 0.6}, ["cologen"], returncode=0,
                  summary={"val_metrics/control/ssim": 0.3}, fingerprint=before)
    (out / "trials.jsonl").write_text(json.dumps(asdict(trial)) + "\n")

    extra.write_text("# a comment changes nothing\nmodel:\n  prw:\n    rank: 4\n")
    assert trial_fingerprint(config, ["--config", str(extra)], REPO) == before
    assert [t.run_id for t in run_local(config, 1, out, ["--config", str(extra)], cwd=REPO)] == ["abc"]
    assert "[sweep] resuming: 1 of 1 trial(s) finished" in capsys.readouterr().out

    extra.write_text("model:\n  prw:\n    rank: 8\n")
    assert trial_fingerprint(config, ["--config", str(extra)], REPO) != before
    assert run_local(config, 0, out, ["--config", str(extra)], cwd=REPO) == []
    assert "1 recorded trial(s) ran another configuration" in capsys.readouterr().out
    assert not (out / "trials.jsonl").exists() and (out / "trials.stale-1.jsonl").is_file()

