"""`python -m cologen.sweep SWEEP.yaml [--trials N] [--local] [-- EXTRA OVERRIDES]`: run a W&B sweep.

With a reachable W&B server (an API key in WANDB_API_KEY or ~/.netrc, and the server answering) it creates the
sweep and runs a W&B agent. Otherwise, or with `--local`, it runs the sweep here with W&B's own sweep engine (the
`sweeps` package: the same search code the server runs): each trial is the command line the agent would run, as a
subprocess with an offline W&B run; its metric (`metric.name`) is read from the trial's summary file
(cologen.callbacks.MetricsSummary), and a table of the trials is printed and written to `<out>/trials.csv`.
Arguments after `--` are appended to every trial's command line (a smaller preset, other data); they imply --local.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import netrc
import os
import platform
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from cologen import compat
from cologen.callbacks.summary import SUMMARY_ENV

DEFAULT_BASE_URL = "https://api.wandb.ai"


# ------------------------------------------------------------------------------------------ config and commands
def load_sweep(path: str | Path) -> dict[str, Any]:
    """The sweep YAML, checked with W&B's own validation (what `wandb sweep` runs before creating it)."""
    config = compat.load_sweep_config(str(path))
    if config is None:
        raise ValueError(f"could not load the sweep config {path}")
    validate_sweep(config)
    return config


def _sweeps():
    with warnings.catch_warnings():  # sweeps 0.2 declares pydantic-v1 style models
        warnings.simplefilter("ignore")
        import sweeps
    return sweeps


def validate_sweep(config: dict[str, Any]) -> None:
    violations = _sweeps().schema_violations_from_proposed_config(config)
    if violations:
        raise ValueError(compat.sweep_violations_text(violations))
    if not (config.get("metric") or {}).get("name"):
        raise ValueError("the sweep needs metric.name: the number each trial is judged by")


def agent_command(config: dict[str, Any], args: dict[str, dict[str, Any]], args_json_file: str = "") -> list[str]:
    """The command line W&B's agent runs for a trial with these `args` ({param: {"value": v}}): the same steps as
    `wandb.wandb_agent.Agent._command_run` (macros ${env} ${interpreter} ${program} ${args} ${args_json} ...)."""
    command = config.get("command")
    command = compat.sweep_command(list(command) if isinstance(command, list) else [])
    sweep_vars: dict[str, Any] = compat.sweep_command_args({"args": args})
    sweep_vars["interpreter"] = ["python"]
    sweep_vars["program"] = [config.get("program")]
    sweep_vars["args_json_file"] = [args_json_file]
    if platform.system() != "Windows":
        sweep_vars["env"] = ["/usr/bin/env"]
    out: list[str] = []
    for chunk in command:
        chunk = str(chunk)
        if chunk.startswith("${") and chunk.endswith("}"):
            out += sweep_vars.get(chunk[2:-1]) or []
        else:
            out.append(chunk)
    return out


def trial_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of trials: this interpreter's bin folder first, so `python` / `cologen` are this venv's."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


# ---------------------------------------------------------------------------------------------- the server
def server_reachable(timeout: float = 2.0) -> bool:
    """An API key is configured and the W&B server accepts a connection within `timeout` seconds."""
    url = urlparse(os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL))
    host = url.hostname or ""
    if not os.environ.get("WANDB_API_KEY"):
        try:
            if netrc.netrc().authenticators(host) is None:
                return False
        except (OSError, netrc.NetrcParseError):
            return False
    try:
        with socket.create_connection((host, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout):
            return True
    except OSError:
        return False


def run_agent(config: dict[str, Any], trials: int | None, project: str) -> None:
    import wandb

    os.environ.update(trial_env())
    os.environ["WANDB_MODE"] = "online"  # the trials' WandbLogger (offline: false) follows it
    sweep_id = wandb.sweep(config, project=project)
    wandb.agent(sweep_id, project=project, count=trials)


# --------------------------------------------------------------------------------------------- local sweeps
@dataclass
class Trial:
    run_id: str
    params: dict[str, Any]
    command: list[str]
    returncode: int | None = None
    seconds: float = 0.0
    summary: dict[str, float] = field(default_factory=dict)
    fingerprint: str = ""  # of what the trial ran (`trial_fingerprint`); a resume counts only matching trials

    def metric(self, name: str) -> float:
        return float(self.summary.get(name, math.nan))


def _sweep_run(trial: Trial, metric: str):
    sweeps = _sweeps()
    ok = trial.returncode == 0
    return sweeps.SweepRun(
        name=trial.run_id, state=sweeps.RunState.finished if ok else sweeps.RunState.failed,
        config={k: {"value": v} for k, v in trial.params.items()}, summary_metrics=trial.summary,
        history=[{metric: trial.summary[metric]}] if metric in trial.summary else [])


def run_trial(config: dict[str, Any], args: dict[str, dict[str, Any]], out_dir: Path,
              extra_args: list[str] | None = None, cwd: Path | None = None) -> Trial:
    """One trial as the agent starts it (plus `extra_args`), with an offline W&B run and the agent's environment:
    its run id, and its parameters in WANDB_SWEEP_PARAM_PATH (so they show in the run's config)."""
    run_id = compat.wandb_run_id()
    params_file, json_file = out_dir / f"{run_id}.params.yaml", out_dir / f"{run_id}.args.json"
    summary_file = out_dir / f"{run_id}.summary.json"
    compat.save_wandb_config(str(params_file), args)
    json_file.write_text(json.dumps({k: v["value"] for k, v in args.items()}))
    trial = Trial(run_id, {k: v["value"] for k, v in args.items()},
                  agent_command(config, args, str(json_file)) + list(extra_args or []))
    env = trial_env()
    env.update({"WANDB_MODE": "offline", "WANDB_RUN_ID": run_id, "WANDB_SWEEP_PARAM_PATH": str(params_file),
                "WANDB_RUN_GROUP": f"sweep-{config.get('name', 'local')}", SUMMARY_ENV: str(summary_file)})
    print(f"[sweep] trial {run_id}: {' '.join(trial.command)}", flush=True)
    start = time.monotonic()
    trial.returncode = subprocess.call(trial.command, env=env, cwd=cwd)
    trial.seconds = time.monotonic() - start
    if summary_file.is_file():
        trial.summary = json.loads(summary_file.read_text())
    return trial


def planned_trials(config: dict[str, Any], trials: int | None) -> int | None:
    """How many trials the sweep will run: `trials`, else the size of a grid (None for an open-ended search)."""
    if trials is not None:
        return trials
    if config.get("method") != "grid":
        return None
    n = 1
    for spec in config.get("parameters", {}).values():
        if "values" in spec:
            n *= len(spec["values"])
        elif "value" not in spec:
            return None
    return n


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def progress_line(k: int, total: int | None, seconds: list[float], params: dict[str, Any]) -> str:
    """`trial k/N (ETA ...)` and the trial's parameters; the ETA assumes the remaining trials (this one included)
    take the mean time of the finished ones."""
    where = f"trial {k}/{total}" if total else f"trial {k}"
    if total and seconds:
        eta = (total - k + 1) * sum(seconds) / len(seconds)
        where += f" (ETA {_duration(eta)} for {total - k + 1} trial(s) at {_duration(sum(seconds) / len(seconds))} each)"
    elif total:
        where += " (ETA after the first trial)"
    return f"[sweep] {where}: " + ", ".join(f"{name}={value}" for name, value in params.items())


def trial_fingerprint(config: dict[str, Any], extra_args: list[str] | None = None, cwd: Path | None = None) -> str:
    """What every trial of this sweep runs: the sweep config, the extra arguments and the parsed contents of every
    `--config` file on the trial command line (a changed setting in experiments/tiny/curriculum.yaml changes it,
    a comment does not). A missing file counts by its name; the trial itself then says it is missing."""
    words = [str(w) for w in [*(config.get("command") or []), *(extra_args or [])]]
    files = {}
    for flag, value in zip(words, words[1:]):
        if flag == "--config":
            path = Path(value) if Path(value).is_absolute() else Path(cwd or ".") / value
            try:
                files[value] = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError):
                files[value] = None
    blob = json.dumps({"sweep": config, "extra": extra_args or [], "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_local(config: dict[str, Any], trials: int | None, out_dir: Path, extra_args: list[str] | None = None,
              cwd: Path | None = None, report: list[str] | None = None) -> list[Trial]:
    """Run up to `trials` trials proposed by W&B's sweep engine (grid: until the grid is exhausted). The table
    (`trials.csv`) and the plot (`trials.png`) are rewritten after every trial."""
    metric = config["metric"]["name"]
    out_dir.mkdir(parents=True, exist_ok=True)
    record = out_dir / "trials.jsonl"  # finished trials: a rerun resumes the sweep after them
    done = [Trial(**json.loads(line)) for line in record.read_text().splitlines() if line.strip()] \
        if record.is_file() else []
    done = [t for t in done if t.returncode == 0]  # a failed trial is proposed again
    fingerprint = trial_fingerprint(config, extra_args, cwd)
    if any(t.fingerprint != fingerprint for t in done):
        # trials of another configuration would pass for this one's: keep their record aside and start afresh
        stale = next(out_dir / f"trials.stale-{k}.jsonl" for k in range(1, 10_000)
                     if not (out_dir / f"trials.stale-{k}.jsonl").exists())
        record.rename(stale)
        print(f"[sweep] {len(done)} recorded trial(s) ran another configuration (the sweep file, a --config file or "
              f"the extra arguments changed): starting afresh; their record is now {stale}", flush=True)
        done = []
    runs: list = [_sweep_run(t, metric) for t in done]
    total = planned_trials(config, trials)
    if done:
        print(f"[sweep] resuming: {len(done)}{f' of {total}' if total else ''} trial(s) finished in {record}",
              flush=True)
    sweeps = _sweeps()
    while trials is None or len(done) < trials:
        with warnings.catch_warnings():  # sweeps 0.2 uses pydantic-v1 style config keys
            warnings.simplefilter("ignore", UserWarning)
            proposal = sweeps.next_run(config, runs, validate=True)
        if proposal is None:
            break
        print(progress_line(len(done) + 1, total, [t.seconds for t in done],
                            {k: v["value"] for k, v in proposal.config.items()}), flush=True)
        trial = run_trial(config, proposal.config, out_dir, extra_args, cwd)
        trial.fingerprint = fingerprint
        print(f"[sweep] trial {trial.run_id} exited {trial.returncode} after {trial.seconds:.0f} s: "
              f"{metric} = {trial.metric(metric):.6g}", flush=True)
        done.append(trial)
        runs.append(_sweep_run(trial, metric))
        with open(record, "a") as f:
            f.write(json.dumps(asdict(trial)) + "\n")
        write_table(done, config, out_dir / "trials.csv", report)  # an interrupted sweep keeps its table
        plot_trials(done, config, out_dir / "trials.png", report)
    return done


def table_rows(done: list[Trial], config: dict[str, Any], report: list[str] | None = None
               ) -> tuple[list[str], list[list[str]]]:
    """One row per trial, best first: its parameters, the sweep metric, the `report` summary keys (routing
    statistics, other tasks' scores), exit code and seconds."""
    metric = config["metric"]["name"]
    params = list(config["parameters"])
    extra = [k for k in report or [] if k != metric]
    header = ["run_id"] + params + [metric] + extra + ["exit", "seconds"]
    rows = [[t.run_id] + [str(t.params.get(p)) for p in params]
            + [f"{t.metric(k):.6g}" for k in [metric] + extra] + [str(t.returncode), f"{t.seconds:.0f}"]
            for t in done]
    goal_max = config["metric"].get("goal", "minimize") == "maximize"
    rows.sort(key=lambda r: (math.isnan(float(r[len(params) + 1])),
                             float(r[len(params) + 1]) * (-1 if goal_max else 1)))
    return header, rows


def write_table(done: list[Trial], config: dict[str, Any], path: Path, report: list[str] | None = None) -> None:
    header, rows = table_rows(done, config, report)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)


def plot_trials(done: list[Trial], config: dict[str, Any], path: Path, report: list[str] | None = None) -> Path | None:
    """The sweep metric (and each `report` key) against the first parameter, one line per value of the others:
    e.g. a task's score and the newest expert's routing share against the gate temperature, per rho."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    params = list(config["parameters"])
    finished = [t for t in done if t.returncode == 0]
    if not params or not finished:
        return None
    x_name, group_names = params[0], params[1:]
    keys = [config["metric"]["name"]] + [k for k in report or [] if k != config["metric"]["name"]]
    fig = Figure(figsize=(4.2 * len(keys), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    groups: dict[tuple, list[Trial]] = {}
    for t in finished:
        groups.setdefault(tuple(t.params.get(g) for g in group_names), []).append(t)
    for ax, key in zip(axes, keys):
        for group, trials in sorted(groups.items(), key=lambda kv: str(kv[0])):
            trials = sorted(trials, key=lambda t: float(t.params[x_name]))
            label = ", ".join(f"{g.split('.')[-1]}={v}" for g, v in zip(group_names, group)) or None
            ax.plot([float(t.params[x_name]) for t in trials], [t.metric(key) for t in trials], "o-", label=label)
        ax.set_xlabel(x_name.split(".")[-1])
        ax.set_title(key, fontsize=8)
        if all(float(t.params[x_name]) > 0 for t in finished):
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    if group_names:
        axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return path


def format_table(done: list[Trial], config: dict[str, Any], report: list[str] | None = None) -> str:
    header, rows = table_rows(done, config, report)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header] + rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    parser = argparse.ArgumentParser(prog="python -m cologen.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="sweep YAML (W&B sweep config)")
    parser.add_argument("--trials", type=int, default=None, help="number of trials (default: the whole grid; "
                        "random / bayes sweeps need it)")
    parser.add_argument("--local", action="store_true", help="run locally even if a W&B server is reachable")
    parser.add_argument("--project", default="cologen", help="W&B project of a server sweep")
    parser.add_argument("--out", default=None, help="folder of the local sweep's files (default runs/sweeps/NAME)")
    parser.add_argument("--report", nargs="*", default=[], metavar="KEY",
                        help="summary keys shown beside the metric in the table and the plot (routing statistics, "
                        "other tasks' scores)")
    ns = parser.parse_args(argv)
    config = load_sweep(ns.sweep)
    if ns.trials is None and config["method"] != "grid":
        parser.error(f"a {config['method']} sweep never ends by itself: give --trials")
    if not ns.local and not extra and server_reachable():
        print(f"[sweep] W&B server reachable: creating the sweep in project {ns.project} and starting an agent")
        run_agent(config, ns.trials, ns.project)
        return 0
    out = Path(ns.out or Path("runs/sweeps") / str(config.get("name") or Path(ns.sweep).stem))
    print(f"[sweep] running locally with W&B's sweep engine ({config['method']}); files in {out}")
    done = run_local(config, ns.trials, out, extra, report=ns.report)
    print(format_table(done, config, ns.report))
    print(f"[sweep] table: {out / 'trials.csv'}, plot: {out / 'trials.png'}; upload the offline runs with "
          "`wandb sync <run dir>/wandb/offline-run-*`")
    return 0 if done and all(t.returncode == 0 for t in done) else 1


if __name__ == "__main__":
    sys.exit(main())
