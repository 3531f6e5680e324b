"""`python -m cologen.report` (`make report`): the README's results tables, generated from the files runs write.

- the tiny curriculum table, from `runs/tiny/stage{1,2,3}/validation/*/scores.jsonl` (written by `make stage1 stage2
  stage3`) and `runs/tiny/base_only/scores.jsonl` (`cologen eval shapeworld --base`, run here when missing): every task's
  headline metrics for the base alone, right after the task's own curriculum step, at the end of stage 3 with the
  routers' choice, with oracle routing and with the true gates (`runs/tiny/true_gates/`, `cologen eval shapeworld
  --true-gates` on stage 3's `last.ckpt`, run here when missing), as means with 95% bootstrap intervals over the
  probes, against the goals;
- the ablation table, from `docs/ablation.json` (`make ablation`);
- the gate-temperature sweep's table, from `runs/sweeps/gate_temperature/trials.csv` (`make sweep`), its plot copied
  to `docs/images/sweep_gate_temperature.png` (without the CSV, the README's sweep table stays as it is).

Each table replaces the block between `<!-- results:NAME -->` and `<!-- /results:NAME -->` in the README and is also
written to `docs/results.md`. Nothing in these tables is typed by hand.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

from cologen.ablation import steps_label
from cologen.eval.results import (
    DETAIL_METRICS,
    HEADLINE_METRICS,
    METRIC_LABELS,
    after_own_step,
    estimate,
    ratio,
    read_eval,
    read_validations,
    score_base,
    score_true_gates,
)
from cologen.metrics.stats import Estimate

# The tiny demonstrator's goals (higher is better; issue 11 of this project): shown beside the measurements.
GOALS: dict[str, float] = {
    "inpainting/psnr_out": 35.0, "inpainting/psnr_in": 16.0, "grounding/hit@0.5": 0.5, "control/ssim": 0.5,
    "customized/subject_score": 0.7, "customized/prompt_fidelity": 0.85, "editing/edit_success": 0.6,
    "editing/preservation": 0.95,
}
FORGETTING_GOAL, ROUTING_GOAL = 0.9, 0.95


def _fmt(e: Estimate | None, digits: int) -> str:
    return e.format(digits) if e is not None else "n/a"


def _digits(metric: str) -> int:
    return 1 if metric.startswith("psnr") else 2


def curriculum_table(stage_dirs: list[Path], base_dir: Path, gates_dir: Path | None = None) -> tuple[str, dict]:
    validations = sorted((v for d in stage_dirs for v in read_validations(d)),
                         key=lambda v: (v.curriculum_step if v.curriculum_step is not None else -1, v.global_step))
    if not validations:
        raise FileNotFoundError(f"no validations with per-probe scores under {', '.join(map(str, stage_dirs))}: "
                                "run `make stage1 stage2 stage3` first")
    final = validations[-1]
    base = read_eval(base_dir)
    gated = read_eval(gates_dir) if gates_dir is not None else None
    rows, numbers = [], {}
    for task, metrics in HEADLINE_METRICS.items():
        own = after_own_step(validations, task)
        for metric in metrics + DETAIL_METRICS.get(task, ()):
            b = estimate([base], task, metric) if base else None
            o = estimate([own], task, metric) if own else None
            f = estimate([final], task, metric)
            orc = estimate([final], task, metric, "oracle")
            true = estimate([gated], task, metric, "true_gates") if gated else None
            goal = GOALS.get(f"{task}/{metric}")
            forget, route = ratio(f, o) if o else float("nan"), ratio(f, orc)
            d = _digits(metric)
            rows.append(f"| {task} {METRIC_LABELS[metric]} | {_fmt(b, d)} | {_fmt(o, d)} | **{_fmt(f, d)}** | "
                        f"{_fmt(orc, d)} | {_fmt(true, d)} | {goal if goal is not None else ''} | {_ratio(forget)} | "
                        f"{_ratio(route)} |")
            numbers[f"{task}/{metric}"] = {"base_only": b.as_dict() if b else None,
                                           "after_own_step": o.as_dict() if o else None, "final": f.as_dict(),
                                           "oracle": orc.as_dict(), "true_gates": true.as_dict() if true else None,
                                           "goal": goal, "forgetting_ratio": forget, "routing_ratio": route}
    per_task = [len({line["index"] for line in final.lines if line["task"] == t}) for t in HEADLINE_METRICS]
    header = [_timing(stage_dirs)] if _timing(stage_dirs) else []
    header += [
        f"Final checkpoint of `make stage3` ({final.path}), {min(per_task)} probes per task, 16 sampler steps; mean ± half-width of the 95% bootstrap interval over probes. \"after its own "
        "step\": the validation that closed the curriculum step which trained the task's expert. \"oracle\": "
        "every task routed to its own expert. \"true gates\": the final checkpoint with every expert's token gates "
        "forced to the tokens each probe changes (`cologen eval shapeworld --true-gates`), what a perfect localiser "
        "would give. Ratios: final / after its own step (forgetting, goal >= "
        f"{FORGETTING_GOAL}) and final / oracle (routing, goal >= {ROUTING_GOAL}).",
        "",
        "| task metric | base only | after its own step | end of stage 3 | oracle routing | true gates | goal | "
        "forgetting | routing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(header + rows) + "\n", numbers


def _timing(stage_dirs: list[Path]) -> str:
    """The stages' wall times, from the summaries their runs wrote (MetricsSummary's `time/fit_seconds`)."""
    seconds = []
    for d in stage_dirs:
        summary = d / "summary.json"
        value = json.loads(summary.read_text()).get("time/fit_seconds") if summary.is_file() else None
        if value is None:
            return ""
        seconds.append(float(value))
    parts = ", ".join(f"`make {d.name}` {s:.0f} s" for d, s in zip(stage_dirs, seconds))
    return f"Wall time of the training runs (summary.json of each stage): {parts}; {sum(seconds) / 60:.1f} min in all.\n"


def _ratio(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else "n/a"


def ablation_table(path: Path) -> str:
    if not path.is_file():
        return f"(no ablation results yet: run `make ablation`, which writes {path})\n"
    table = json.loads(path.read_text())
    cols = [(t, ms[0]) for t, ms in HEADLINE_METRICS.items()] + [("customized", "prompt_fidelity"),
                                                                  ("editing", "preservation")]
    lines = ["| variant | seeds | steps | " + " | ".join(f"{t} {METRIC_LABELS[m]}" for t, m in cols) + " | min per run |",
             "|---|---|---|" + "---|" * len(cols) + "---|"]
    for name, row in table.items():
        cells = []
        for t, m in cols:
            d = row["metrics"][f"{t}/{m}"]["final"]
            cells.append(Estimate(d["mean"], d["low"], d["high"], d["n"]).format(_digits(m)))
        minutes = f"{row['seconds'] / 60:.0f}" if row.get("seconds") is not None else ""  # none for a reference row
        lines.append(f"| {name} | {row['seeds'] or ''} | {steps_label(row)} | " + " | ".join(cells) + f" | {minutes} |")
    return (f"From `{path}` (`make ablation`; the full table with every metric, the forgetting and routing "
            "ratios and the plot: docs/ablation.md).\n\n" + "\n".join(lines) + "\n")


# The sweep's columns, in the order shown, with their labels (the CSV names them by summary key).
SWEEP_COLUMNS = {
    "model.prw.router.temperature": "temperature", "model.veteran.rho": "rho",
    "val_metrics/control/ssim": "control SSIM (the metric)", "val_metrics/inpainting/psnr_out":
    "inpainting PSNR outside (dB)", "val_routing/control/expert1": "control to the newest expert",
    "val_routing/control/own_expert": "control to its own expert", "val_routing/inpainting/own_expert":
    "inpainting to its own expert", "val/routing_entropy": "router entropy", "seconds": "s",
}


def sweep_table(csv_path: Path, image: str | None = None) -> str | None:
    """The sweep's trials (best first, as `make sweep` writes them) as a markdown table, with the plot at `image` (a
    link relative to the page); None without the CSV."""
    if not csv_path.is_file():
        return None
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = [c for c in SWEEP_COLUMNS if rows and c in rows[0]]
    lines = ["| " + " | ".join(SWEEP_COLUMNS[c] for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        # a score with its 95% interval over the trial's probes where its validation files are there (the run
        # folder beside the CSV), else the CSV's mean
        finals = read_validations(csv_path.parent / row["run_id"])[-1:]
        cells = []
        for c in cols:
            digits = 1 if "psnr" in c else 3
            if c in ("model.prw.router.temperature", "model.veteran.rho", "seconds"):
                cells.append(row[c])
            elif c.startswith("val_metrics/") and finals:
                task, metric = c.removeprefix("val_metrics/").split("/", 1)
                cells.append(estimate(finals, task, metric).format(digits))
            else:
                cells.append(f"{float(row[c]):.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    seconds = sum(float(r["seconds"]) for r in rows)
    failed = sum(r.get("exit", "0") != "0" for r in rows)
    note = f"{len(rows)} trials, {seconds / 60:.0f} min of trials in all" + (f", {failed} failed" if failed else "")
    plot = f"\n![the metric and the routing statistics against the temperature, per rho]({image})\n" if image else ""
    return (f"From `{csv_path}` (`make sweep`; {note}); scores at the trial's end, mean ± half-width of the 95% "
            "bootstrap interval over its probes.\n\n"
            + "\n".join(lines) + "\n" + plot)


def _block(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- results:{name} -->\n)(.*?)(<!-- /results:{name} -->)", re.S)


def read_block(text: str, name: str) -> str | None:
    found = _block(name).search(text)
    return found.group(2) if found else None


def replace_block(text: str, name: str, body: str) -> str:
    pattern = _block(name)
    if not pattern.search(text):
        raise ValueError(f"the README has no <!-- results:{name} --> ... <!-- /results:{name} --> block")
    return pattern.sub(lambda m: m.group(1) + body + m.group(3), text)


TABLES = ("curriculum", "ablation", "sweep")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cologen.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs/tiny", help="the tiny stages' run folders (default: %(default)s)")
    parser.add_argument("--ablation", default="docs/ablation.json")
    parser.add_argument("--sweep", default="runs/sweeps/gate_temperature/trials.csv")
    parser.add_argument("--readme", default="README.md")
    parser.add_argument("--out", default="docs/results.md")
    parser.add_argument("--config", default="experiments/tiny/curriculum.yaml",
                        help="the curriculum's config: the base is scored on its validation probes")
    parser.add_argument("--tables", nargs="+", choices=TABLES, default=list(TABLES),
                        help="rewrite only these tables; the others stay as the README has them (default: all)")
    ns = parser.parse_args(argv)
    curriculum = numbers = None
    if "curriculum" in ns.tables:
        runs = Path(ns.runs)
        base_dir = runs / "base_only"
        score_base(base_dir, ns.config)
        gates_dir = runs / "true_gates"
        score_true_gates(gates_dir, runs / "stage3" / "last.ckpt", ns.config)
        try:
            curriculum, numbers = curriculum_table([runs / f"stage{i}" for i in (1, 2, 3)], base_dir, gates_dir)
        except FileNotFoundError as err:
            print(f"report: {err}", file=sys.stderr)
            return 2
    readme = Path(ns.readme)
    text = readme.read_text()
    if curriculum is not None:
        text = replace_block(text, "curriculum", curriculum)
    curriculum = read_block(text, "curriculum") or ""
    if "ablation" in ns.tables:
        text = replace_block(text, "ablation", ablation_table(Path(ns.ablation)))
    ablation = read_block(text, "ablation") or ""
    sweep_csv, out = Path(ns.sweep), Path(ns.out)
    plot = out.parent / "images" / "sweep_gate_temperature.png"
    if (sweep_csv.parent / "trials.png").is_file():
        plot.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sweep_csv.parent / "trials.png", plot)
    # the plot's link, from the README and from docs/results.md
    link, docs_link = os.path.relpath(plot, readme.parent), os.path.relpath(plot, out.parent)
    sweep = sweep_table(sweep_csv, link if plot.is_file() else None) if "sweep" in ns.tables else None
    if sweep is None and "sweep" in ns.tables:
        print(f"[report] no {sweep_csv} (make sweep): the README's sweep table is left as it is", flush=True)
    if sweep is None:
        sweep = read_block(text, "sweep") or "(no sweep results yet: run `make sweep`)\n"
    text = replace_block(text, "sweep", sweep)
    readme.write_text(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Results on the tiny preset\n\nGenerated by `make report` (do not edit by hand).\n\n"
                   "## The curriculum (`make stage1 stage2 stage3`)\n\n" + curriculum + "\n## Ablation\n\n" + ablation
                   + "\n## Gate-temperature sweep\n\n"
                   + sweep.replace(f"]({link})", f"]({docs_link})"))
    if numbers is not None:  # the curriculum's numbers (tests compare the README with them)
        out.with_suffix(".json").write_text(json.dumps(numbers, indent=1) + "\n")
    print(f"[report] {readme} and {out} updated", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
