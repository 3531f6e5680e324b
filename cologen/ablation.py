"""`python -m cologen.ablation ABLATION.yaml [--seeds 0 1] [--configs curriculum cotrain]`: `make ablation`.

Trains every variant of the ablation file with every seed (each run is one `cologen fit` of the whole curriculum,
validated with >= 64 probes per task after every curriculum step, with learned and oracle routing), then writes the
table (`report`, markdown: mean ± 95% bootstrap interval per task metric, over probes and seeds, the optimizer steps
the seeds trained and the runtime), its numbers as JSON and a plot. Resumable: a finished run is skipped, an
interrupted one continues from its `last.ckpt`; rerunning only re-aggregates. `--report-only` skips training.
Stopping the driver (Ctrl-C, `kill`) stops the training attempt with it and still adds the attempt's time to the
run's runtime. A run
finished from another tiny base than its variant loads now (the base was replaced) is set aside, kept as a row of
its own, and the seed trained again.

With `records`, every finished run also leaves a compact record there (its validations' metrics and per-probe scores,
gzipped, and its runtime with the machine it ran on; ~100 KB), meant to be committed: the table is built from the
records, a recorded run counts as finished, so runs made on different machines and days add up to the seeds the
ablation asks for (run folders, with their checkpoints, stay on the machine that trained them).

The ablation file:

    configs: [experiments/tiny/curriculum.yaml]   # every run's configs, in order
    args: [--curriculum.spec.run_steps, "null"]   # every run's extra arguments
    seeds: [0, 1, 2]
    out: runs/ablation                             # run folders: {out}/{variant}/seed{seed}
    report: docs/ablation.md                       # also {stem}.json and {stem}.png
    base: runs/ablation/base_only                  # optional: the base alone, scored here when missing
    records: docs/ablation_runs                    # optional: each finished run's record: {records}/{variant}/seed{seed}
                                                   # ({records}/{variant}/base-{sha256 prefix}/seed{seed}: a run
                                                   # trained from another tiny base, set aside and kept)
    snapshot: docs/ablation_runs/snapshot.json     # optional: an earlier report's JSON, its rows shown marked
    variants:                                      # name -> configs layered on top, a description
      curriculum: {configs: [], description: ...}
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cologen.eval.results import (
    HEADLINE_METRICS,
    METRIC_LABELS,
    Validation,
    after_own_step,
    estimate,
    ratio,
    read_validations,
    score_base,
)
from cologen.machine import describe as describe_machine
from cologen.machine import label as machine_label
from cologen.metrics.stats import Estimate

DONE = "done.json"
# The tiny base every record trained on before done.json named its base (the one committed until then)
EARLIER_BASE = "831b44119b293486107247272b49c949b203802f2934c1c5cf5b9f64bdcfb568"


@dataclass
class Variant:
    name: str
    configs: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    description: str = ""


@dataclass
class AblationSpec:
    variants: list[Variant]
    configs: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    out: str = "runs/ablation"
    report: str = "docs/ablation.md"
    base: str | None = None  # a `cologen eval shapeworld --base` folder: the table's "base only" row
    records: str | None = None  # each finished run's record (committed): {records}/{variant}/seed{seed}
    # a table written before records were kept (an earlier report's JSON): its rows are shown beside the recorded
    # ones, marked, until every variant has recorded seeds (they cannot be pooled: their per-probe scores are gone)
    snapshot: str | None = None

    @classmethod
    def load(cls, path: str | Path) -> AblationSpec:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        variants = raw.pop("variants", None)
        if not variants:
            raise ValueError(f"{path}: no variants")
        unknown = set(raw) - {"configs", "args", "seeds", "out", "report", "base", "records", "snapshot", "name"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        raw.pop("name", None)
        spec = cls([Variant(name, **(v or {})) for name, v in variants.items()], **raw)
        if spec.snapshot and not Path(spec.snapshot).is_file():
            raise FileNotFoundError(f"{path}: snapshot {spec.snapshot} does not exist")
        for v in spec.variants:
            for c in spec.configs + v.configs:
                if not Path(c).is_file():
                    raise FileNotFoundError(f"{path}: variant {v.name}: config {c} does not exist")
        return spec

    def run_dir(self, variant: str, seed: int) -> Path:
        return Path(self.out) / variant / f"seed{seed}"

    def record_dir(self, variant: str, seed: int) -> Path | None:
        return Path(self.records) / variant / f"seed{seed}" if self.records else None

    def finished(self, variant: str, seed: int) -> Path | None:
        """The folder that holds the finished run's validations: its record (written from the run folder first
        when the run finished here before it had one), else its run folder; None while it is not finished."""
        record = self.record_dir(variant, seed)
        if record is not None and (record / DONE).is_file():
            return record
        run = self.run_dir(variant, seed)
        if not (run / DONE).is_file():
            return None
        return save_record(run, record) if record is not None else run

    def set_aside_dir(self, root: str, variant: str, seed: int, base: str) -> Path:
        """Where a finished run trained from another base than its variant's configs load now is kept (`root`: the
        records or the run folders): {root}/{variant}/base-{sha256 prefix}/seed{seed}."""
        return Path(root) / variant / f"base-{base_label(base)}" / f"seed{seed}"

    def set_aside(self, variant: str, seed: int) -> list[Path]:
        """The finished runs of (variant, seed) set aside by `set_aside_run` (records when the ablation keeps them,
        else run folders), one per base they trained from."""
        root = Path(self.records or self.out) / variant
        return sorted(p.parent for p in root.glob(f"base-*/seed{seed}/{DONE}"))


# --------------------------------------------------------------------------------------------------- bases
def base_digest(base: str | None) -> str:
    """What a run's `model.preset.init_args.base` trains from: the sha256 of a tiny base folder ('builtin': the
    committed one), 'random' for random weights (null), the path itself when it holds no base."""
    from cologen.model.presets import TinyPreset, recorded_sha256

    if base is None:
        return "random"
    return recorded_sha256(TinyPreset(base=base).base_dir()) or str(base)


def _preset_base(config: dict, base: str | None) -> str | None:
    init_args = (((config or {}).get("model") or {}).get("preset") or {}).get("init_args") or {}
    return init_args["base"] if "base" in init_args else base


def configured_base(spec: AblationSpec, variant: Variant) -> str:
    """The base a variant's runs train from now: its configs' (and args') `model.preset.init_args.base`, the last
    one that sets it winning as in LightningCLI; the preset's default 'builtin' when none does."""
    base: str | None = "builtin"
    for c in spec.configs + variant.configs:
        base = _preset_base(yaml.safe_load(Path(c).read_text()), base)
    args = spec.args + variant.args
    for flag, value in zip(args, args[1:]):
        if flag == "--model.preset.init_args.base":
            base = None if value in ("null", "None") else value
    return base_digest(base)


def trained_base(done: dict[str, Any]) -> str:
    """The base a finished run's done.json says it trained from (EARLIER_BASE when it predates naming one)."""
    return done.get("base", EARLIER_BASE)


def base_label(digest: str) -> str:
    return digest[:8] if len(digest) == 64 else digest


# ------------------------------------------------------------------------------------------------- records
def save_record(run_dir: Path, record_dir: Path) -> Path:
    """Copy what the table needs from a finished run folder into `record_dir`: every validation's metrics.json and
    its per-probe scores (gzipped), and done.json (runtime; the machine, this one when the run did not say).
    Written into a temporary folder and renamed, so a record is either whole or absent."""
    tmp = record_dir.with_name(record_dir.name + ".tmp")
    for stale in (tmp, record_dir):  # a half-written copy, or a record without its done.json
        if stale.exists():
            shutil.rmtree(stale)
    for step in sorted((run_dir / "validation").glob("step*")):
        metrics, scores = step / "metrics.json", step / "scores.jsonl"
        if not (metrics.is_file() and scores.is_file()):
            continue
        out = tmp / "validation" / step.name
        out.mkdir(parents=True)
        (out / "metrics.json").write_bytes(metrics.read_bytes())
        # mtime 0: the same scores give the same bytes, so a re-recorded run leaves git nothing to commit
        with gzip.GzipFile(out / "scores.jsonl.gz", "wb", mtime=0) as f:
            f.write(scores.read_bytes())
    tmp.mkdir(parents=True, exist_ok=True)
    done = json.loads((run_dir / DONE).read_text())
    done.setdefault("machine", describe_machine())  # a run folder is on the machine that trained it
    (tmp / DONE).write_text(json.dumps(done) + "\n")
    tmp.rename(record_dir)
    return record_dir


# ------------------------------------------------------------------------------------------------- running
def run_command(spec: AblationSpec, variant: Variant, seed: int) -> list[str]:
    run_dir = spec.run_dir(variant.name, seed)
    cmd = [sys.executable, "-m", "cologen.cli", "fit"]
    for c in spec.configs + variant.configs:
        cmd += ["--config", c]
    cmd += list(spec.args) + list(variant.args)
    cmd += ["--seed_everything", str(seed), "--data.init_args.seed", str(seed),
            "--trainer.default_root_dir", str(run_dir)]
    if (run_dir / "last.ckpt").is_file():
        cmd += ["--ckpt_path", str(run_dir / "last.ckpt")]
    return cmd


def set_aside_run(spec: AblationSpec, variant: str, seed: int, base: str) -> None:
    """Move a finished run trained from `base` (its record and its run folder, checkpoints included) to its
    base's folder beside the seeds, so the seed trains again from the base its configs load now while the run
    stays in the table as a row of its own (a replaced tiny base: `make base-continue`, `make base-gpu`)."""
    for root, folder in ((spec.records, spec.record_dir(variant, seed)), (spec.out, spec.run_dir(variant, seed))):
        if root is None or folder is None or not (folder / DONE).is_file():
            continue
        target = spec.set_aside_dir(root, variant, seed, base)
        if target.exists():
            raise FileExistsError(f"{folder} trained from base {base_label(base)}, and {target} already holds a run "
                                  "of that base: move one of them away")
        target.parent.mkdir(parents=True, exist_ok=True)
        folder.rename(target)


@contextmanager
def _terminate_raises():
    """SIGTERM (`kill`, a scheduler's preemption) raises SystemExit here instead of ending the process on the spot,
    so `finally` blocks run. Only the main thread may install signal handlers; elsewhere this changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_one(spec: AblationSpec, variant: Variant, seed: int) -> dict[str, Any]:
    """Train one (variant, seed) unless it is done from the base it trains from now; returns its done record
    (seconds, exit code). A run finished from another base is set aside (kept) and the seed trained again."""
    finished = spec.finished(variant.name, seed)
    if finished is not None:
        done = json.loads((finished / DONE).read_text())
        trained_from, current = trained_base(done), configured_base(spec, variant)
        if trained_from == current:
            return done
        set_aside_run(spec, variant.name, seed, trained_from)
        print(f"[ablation] {variant.name} seed {seed} trained from base {base_label(trained_from)}, not "
              f"{base_label(current)}: kept under base-{base_label(trained_from)}/, training it again", flush=True)
    run_dir = spec.run_dir(variant.name, seed)
    done_file = run_dir / DONE
    run_dir.mkdir(parents=True, exist_ok=True)
    timing = run_dir / "seconds.json"  # wall time over every attempt (a resumed run adds up)
    spent = json.loads(timing.read_text())["seconds"] if timing.is_file() else 0.0
    cmd = run_command(spec, variant, seed)
    print(f"[ablation] {variant.name} seed {seed}: {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    try:
        with _terminate_raises():
            code = subprocess.call(cmd)  # which kills the attempt on any exception, a stopped driver's included
    finally:  # a stopped driver still counts the attempt's time; the next invocation resumes from last.ckpt
        spent += time.monotonic() - start
        timing.write_text(json.dumps({"seconds": spent}))
    record = {"variant": variant.name, "seed": seed, "seconds": round(spent, 1), "returncode": code,
              "machine": describe_machine(), "base": configured_base(spec, variant)}
    if code == 0:
        done_file.write_text(json.dumps(record) + "\n")
        spec.finished(variant.name, seed)  # its record, when the ablation keeps them
    else:
        print(f"[ablation] {variant.name} seed {seed} failed (exit {code}); rerun to resume it", flush=True)
    return record


# --------------------------------------------------------------------------------------------- aggregating
def _metrics() -> list[tuple[str, str]]:
    return [(task, metric) for task, metrics in HEADLINE_METRICS.items() for metric in metrics]


def aggregate(spec: AblationSpec) -> dict[str, Any]:
    """Per variant: every headline metric at the end (learned and oracle routing) and right after its own step,
    as mean and 95% interval over seeds and probes; the forgetting and routing ratios; the runtime."""
    table: dict[str, Any] = {}
    for v in spec.variants:
        # seeds trained on another base than the variant's configs load now are a row of their own, never pooled
        current = configured_base(spec, v)
        by_base: dict[str, list[tuple[list[Validation], dict]]] = {}
        for seed in spec.seeds:
            for folder in [spec.finished(v.name, seed), *spec.set_aside(v.name, seed)]:
                validations = read_validations(folder) if folder is not None else []
                if validations:
                    done = json.loads((folder / DONE).read_text())
                    by_base.setdefault(trained_base(done), []).append((validations, done))
        for base in sorted(by_base, key=lambda b: b != current):
            name = v.name if base == current else f"{v.name}, base {base_label(base)}"
            table[name] = _aggregate_runs(v, by_base[base]) | ({} if base == current else {"base": base})
    return table


def _aggregate_runs(v: Variant, finished: list[tuple[list[Validation], dict]]) -> dict[str, Any]:
    runs = [validations for validations, _ in finished]
    seconds = [done["seconds"] for _, done in finished]
    machines = [machine_label(done["machine"]) for _, done in finished if done.get("machine")]
    rows: dict[str, Any] = {}
    for task, metric in _metrics():
        final = estimate([r[-1] for r in runs], task, metric)
        oracle = estimate([r[-1] for r in runs], task, metric, "oracle")
        own = estimate([after_own_step(r, task) for r in runs], task, metric)
        rows[f"{task}/{metric}"] = {"final": final.as_dict(), "oracle": oracle.as_dict(),
                                    "after_own_step": own.as_dict()}
    # the optimizer steps the seeds trained (a curriculum's budget can change; a variant's records keep theirs)
    steps = sorted({r[-1].global_step for r in runs})
    return {"description": v.description, "seeds": len(runs), "steps": steps, "seconds": sum(seconds) / len(seconds),
            "machines": sorted(set(machines)), "metrics": _with_ratios(rows)}


def references(spec: AblationSpec, table: dict[str, Any]) -> dict[str, Any]:
    """Rows to read the variants against (`"reference": true`, final scores only): the base alone (`spec.base`,
    scored on the first config's probes when missing) and the first variant that has oracle scores, with every
    task on its own expert: what its routers could reach."""
    rows: dict[str, Any] = {}
    if spec.base:
        base = score_base(spec.base, spec.configs[0])
        rows["base only"] = {"reference": True, "description": "the base alone, no expert (`cologen eval shapeworld "
                             "--base` on the same probes)", "seeds": 0, "seconds": None,
                             "metrics": {f"{t}/{m}": {"final": estimate([base], t, m).as_dict()} for t, m in _metrics()}}
    for v in spec.variants:  # the first with oracle scores (a one-expert variant has none)
        oracle = {k: {"final": m["oracle"]} for k, m in table.get(v.name, {}).get("metrics", {}).items()}
        if any(math.isfinite(m["final"]["mean"]) for m in oracle.values()):
            rows[f"{v.name}, oracle routing"] = {
                "reference": True, "description": f"{v.name}'s runs with every task routed to its own expert",
                "seeds": table[v.name]["seeds"], "seconds": None, "metrics": oracle}
            break
    return rows


def _est(d: dict) -> Estimate:
    return Estimate(d["mean"], d["low"], d["high"], d["n"])


def steps_label(row: dict[str, Any]) -> str:
    """A table row's optimizer steps ('3200'; '3200, 4200' if its seeds differ; '' for a reference or snapshot row)."""
    return ", ".join(str(n) for n in row.get("steps", []))


def markdown(table: dict[str, Any], spec: AblationSpec, command: str) -> str:
    cols = _metrics()
    source = (f"run records under `{spec.records}/` (each finished run's, from any machine)" if spec.records
              else f"run folders under `{spec.out}/`")
    lines = [
        "# Ablation on the tiny preset",
        "",
        f"Generated by `{command}` (`make ablation`) from the {source} (do not edit by hand). Every variant "
        "trains the optimizer-step budget of the curriculum it varies (the steps column); each cell is the mean "
        "over seeds and probes (>= 64 per task) "
        "at the end of the run, ± the half-width of a 95% two-level bootstrap interval (seeds, then probes). "
        "Metric definitions: docs/metrics.md.",
        "",
        "| variant | seeds | steps | " + " | ".join(f"{t} {METRIC_LABELS[m]}" for t, m in cols) + " | minutes per run |",
        "|---|---|---|" + "---|" * len(cols) + "---|",
    ]
    for name, row in table.items():
        cells = [_est(row["metrics"][f"{t}/{m}"]["final"]).format(2) for t, m in cols]
        minutes = f"{row['seconds'] / 60:.1f}" if row.get("seconds") is not None else ""  # none for a reference row
        lines.append(f"| {name} | {row['seeds'] or ''} | {steps_label(row)} | " + " | ".join(cells) + f" | {minutes} |")
    for key, title in (("forgetting_ratio", "Forgetting: final score / score right after the task's own curriculum "
                         "step"), ("routing_ratio", "Routing: score with the routers' choice / score with every task on "
                                   "its own expert")):
        lines += ["", f"{title}, per metric (n/a where the score divided by is not told apart from 0: its 95% "
                  "interval reaches 0):", "",
                  "| variant | " + " | ".join(f"{t} {METRIC_LABELS[m]}" for t, m in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        lines += [f"| {name} | " + " | ".join(_fmt_ratio(row["metrics"][f"{t}/{m}"][key]) for t, m in cols) + " |"
                  for name, row in table.items() if not row.get("reference")]
    lines += ["", "Variants:", ""]
    lines += [f"- **{v.name}**: {v.description}" for v in spec.variants if v.name in table]
    lines += [f"- **{name}** (reference): {row['description']}" for name, row in table.items() if row.get("reference")]
    if any(row.get("base") for row in table.values()):
        lines += ["", "Rows named '..., base <sha256 prefix>' hold the seeds trained from another tiny base than the "
                  "one the variant's configs load now (each record's done.json names its base; records without one "
                  f"trained on {base_label(EARLIER_BASE)}): they are not pooled with the others."]
    if any(row.get("snapshot") for row in table.values()):
        lines += ["", f"Rows named '..., snapshot' are from `{spec.snapshot}`, a table written before the runs' records "
                  "were kept: their per-probe scores are gone, so they stand beside the recorded seeds instead of being "
                  "pooled with them."]
    machines = sorted({m for row in table.values() for m in row.get("machines", [])})
    if machines:
        lines += ["", "Minutes per run are the mean wall time of a variant's runs, measured on: " + "; ".join(machines)
                  + " (compare runtimes measured on one kind of CPU: an AVX-512 CPU trains the tiny model much faster "
                  "than an AVX2-only one of the same core count)."]
    pending = [f"{v.name} ({len(spec.seeds) - table.get(v.name, {}).get('seeds', 0)} of {len(spec.seeds)} seeds)"
               for v in spec.variants if table.get(v.name, {}).get("seeds", 0) < len(spec.seeds)]
    if pending:
        lines += ["", "Seeds not yet trained from the base the variants load now (`make ablation` trains them; "
                  "finished runs are kept, and those from another base stay rows of their own): "
                  + ", ".join(pending) + "."]
    return "\n".join(lines) + "\n"


def _fmt_ratio(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else "n/a"


def plot(table: dict[str, Any], path: Path) -> Path | None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not table:
        return None
    cols = _metrics()
    names = list(table)
    # one horizontal bar per row, named once in the first column: ~50 rows stay legible
    fig = Figure(figsize=(3.0 * 5 + 2.5, 2 * (0.8 + 0.12 * len(names)) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 5, squeeze=False, sharey=True)
    rows = range(len(names))
    for k, (task, metric) in enumerate(cols):
        ax = axes[k % 2][k // 2]
        ests = [_est(table[n]["metrics"][f"{task}/{metric}"]["final"]) for n in names]
        means = [e.mean if math.isfinite(e.mean) else 0.0 for e in ests]
        err = [[max(e.mean - e.low, 0) if math.isfinite(e.low) else 0 for e in ests],
               [max(e.high - e.mean, 0) if math.isfinite(e.high) else 0 for e in ests]]
        ax.barh(rows, means, xerr=err, capsize=1.5, color=[f"C{i}" for i in rows])
        ax.set_title(f"{task}: {METRIC_LABELS[metric]}", fontsize=8)
        ax.tick_params(labelsize=6)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(rows, names)  # shared: every panel's rows, named in the first column
    axes[0][0].invert_yaxis()  # the table's order, top to bottom
    fig.suptitle("tiny ablation: final scores, mean and 95% interval over seeds and probes", fontsize=9)
    fig.savefig(path, dpi=110)
    return path


def with_snapshot(spec: AblationSpec, table: dict[str, Any]) -> dict[str, Any]:
    """`table` with the snapshot's variant rows (`spec.snapshot`), each after its variant's recorded rows and named
    '{variant}, snapshot'; its reference rows are left out (they are rebuilt from the records)."""
    if not spec.snapshot:
        return table
    snapshot = json.loads(Path(spec.snapshot).read_text())
    merged: dict[str, Any] = {}
    for v in spec.variants:
        merged |= {name: row for name, row in table.items() if name == v.name or name.startswith(f"{v.name}, base ")}
        row = snapshot.get(v.name)
        if row is not None and not row.get("reference"):
            merged[f"{v.name}, snapshot"] = {**row, "snapshot": True, "metrics": _with_ratios(row["metrics"])}
    return merged


def _with_ratios(metrics: dict[str, Any]) -> dict[str, Any]:
    """Each metric's estimates with its forgetting ratio (final / after its own step) and routing ratio (final /
    oracle): the one place they are computed, for recorded rows and for a snapshot's (whose stored ratios may
    predate the rule)."""
    def of(m: dict, key: str) -> float:
        return ratio(_est(m["final"]), _est(m[key])) if key in m else float("nan")
    return {k: {**m, "forgetting_ratio": of(m, "after_own_step"), "routing_ratio": of(m, "oracle")}
            for k, m in metrics.items()}


def write_report(spec: AblationSpec, command: str) -> dict[str, Any]:
    table = aggregate(spec)
    table = with_snapshot(spec, table) | references(spec, table)
    report = Path(spec.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(markdown(table, spec, command))
    report.with_suffix(".json").write_text(json.dumps(table, indent=1) + "\n")
    plot(table, report.with_suffix(".png"))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cologen.ablation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ablation", help="the ablation file (experiments/ablation/tiny.yaml)")
    parser.add_argument("--seeds", nargs="*", type=int, help="only these seeds (default: the file's)")
    parser.add_argument("--configs", nargs="*", help="only these variants (default: all)")
    parser.add_argument("--report-only", action="store_true", help="aggregate the finished runs, train nothing")
    ns = parser.parse_args(argv)
    try:
        spec = AblationSpec.load(ns.ablation)
    except (FileNotFoundError, ValueError) as err:
        print(f"ablation: {err}", file=sys.stderr)
        return 2
    names = [v.name for v in spec.variants]
    unknown = [c for c in ns.configs or [] if c not in names]
    if unknown:
        print(f"ablation: unknown variants {unknown}; the file has {names}", file=sys.stderr)
        return 2
    variants = [v for v in spec.variants if not ns.configs or v.name in ns.configs]
    seeds = ns.seeds if ns.seeds else spec.seeds
    started = time.monotonic()
    failed = []
    if not ns.report_only:
        for seed in seeds:  # seed-major: a partial ablation has every variant's first seed
            for v in variants:
                if run_one(spec, v, seed)["returncode"] != 0:
                    failed.append((v.name, seed))
    table = write_report(spec, f"python -m cologen.ablation {ns.ablation}")
    total = time.monotonic() - started
    runs = sum(row["seeds"] for row in table.values() if not row.get("reference"))
    print(f"[ablation] {runs} finished runs in the table; {spec.report} (+ .json, .png) written; this invocation "
          f"took {total / 60:.1f} min", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
