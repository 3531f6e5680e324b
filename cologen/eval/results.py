"""Reading a run's validations back: per curriculum step, per task, per probe, with learned and oracle routing.

`SampleValidation` writes `validation/step*/metrics.json` (with the curriculum step it closes) and `scores.jsonl`
(one line per probe and routing mode). This module turns those files into the numbers the README, `make ablation`
and the sweep report: each task's headline metrics right after its own curriculum step and at the end of the run,
with the routers' choice and with oracle routing, as means with bootstrap confidence intervals.
"""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cologen.metrics.stats import Estimate, bootstrap_ci

# The numbers each task is judged by (all higher is better), in the order tables show them.
HEADLINE_METRICS: dict[str, tuple[str, ...]] = {
    "inpainting": ("psnr_out", "psnr_in"),
    "grounding": ("hit@0.5", "box_iou"),
    "control": ("ssim", "psnr"),
    "customized": ("subject_score", "prompt_fidelity"),
    "editing": ("edit_success", "preservation"),
}
# Shown in the curriculum table below a task's headline metrics, without a goal; not in the ablation's table, whose
# older records predate them.
DETAIL_METRICS: dict[str, tuple[str, ...]] = {
    "editing": ("objects_kept",),  # preservation's mean over mostly background hides erased objects
}
METRIC_LABELS: dict[str, str] = {
    "psnr_out": "PSNR outside the mask (dB)", "psnr_in": "PSNR inside the mask (dB)", "hit@0.5": "hit@0.5",
    "box_iou": "box IoU", "ssim": "SSIM", "psnr": "PSNR (dB)", "subject_score": "subject score",
    "prompt_fidelity": "prompt fidelity", "edit_success": "success", "preservation": "preservation",
    "objects_kept": "objects kept outside the edit",
}


@dataclass
class Validation:
    """One validation of a run: where, after which curriculum step, and its per-probe score lines."""

    path: Path
    global_step: int
    curriculum_step: int | None
    metrics: dict
    lines: list[dict]

    def scores(self, task: str, metric: str, routing: str = "learned") -> list[float]:
        key = f"{task}/{metric}"
        return [float(line[key]) for line in self.lines
                if line.get("task") == task and line.get("routing", "learned") == routing
                and line.get(key) is not None and math.isfinite(float(line[key]))]


def read_validations(run_dir: str | Path, subdir: str = "validation") -> list[Validation]:
    """Every validation of a run folder or of an ablation's run record (its scores gzipped: `scores.jsonl.gz`)
    that has per-probe scores, in order of their global step."""
    out = []
    for d in sorted((Path(run_dir) / subdir).glob("step*")):
        metrics_file = d / "metrics.json"
        scores_file = next((f for f in (d / "scores.jsonl", d / "scores.jsonl.gz") if f.is_file()), None)
        if not metrics_file.is_file() or scores_file is None:
            continue
        metrics = json.loads(metrics_file.read_text())
        raw = gzip.decompress(scores_file.read_bytes()) if scores_file.suffix == ".gz" else scores_file.read_bytes()
        lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
        out.append(Validation(d, int(d.name.removeprefix("step")), metrics.get("curriculum_step"), metrics, lines))
    return sorted(out, key=lambda v: v.global_step)


def read_eval(folder: str | Path) -> Validation | None:
    """A `cologen eval shapeworld --out` folder as a Validation (e.g. the base alone); None if it is not there."""
    scores_file = Path(folder) / "scores.jsonl"
    if not scores_file.is_file():
        return None
    lines = [json.loads(line) for line in scores_file.read_text().splitlines() if line.strip()]
    return Validation(Path(folder), 0, None, {}, lines)


BASE_STAMP = "base.sha256"  # beside the base's scores: the committed base they were scored on


def _scored_once(folder: str | Path, stamp_name: str, digest: str, eval_args: list[str], what: str) -> Validation:
    """`cologen eval shapeworld EVAL_ARGS --out folder`, run only when the folder has no scores stamped with `digest`
    yet (the sha256 of what they scored, in `folder/stamp_name`)."""
    stamp = Path(folder) / stamp_name
    found = read_eval(folder)
    if found is not None and stamp.is_file() and stamp.read_text().strip() == digest:
        return found
    print(f"[results] {what} into {folder} (cologen eval shapeworld {' '.join(eval_args)})", flush=True)
    subprocess.check_call([sys.executable, "-m", "cologen.cli", "eval", "shapeworld", *eval_args,
                           "--out", str(folder)])
    stamp.write_text(digest + "\n")
    return read_eval(folder)


def score_base(folder: str | Path, config: str) -> Validation:
    """The committed tiny base alone scored on `config`'s validation probes (`cologen eval shapeworld --base`) into
    `folder`, run only when the folder has no scores of this base yet (`make base` or `make base-continue` may have
    replaced it since)."""
    from cologen.model.presets import TINY_BASE_DIR, recorded_sha256

    return _scored_once(folder, BASE_STAMP, recorded_sha256(TINY_BASE_DIR), ["--base", "--config", config],
                        "scoring the base alone")


CHECKPOINT_STAMP = "checkpoint.sha256"  # beside a checkpoint's true-gate scores: the checkpoint they were scored on


def score_true_gates(folder: str | Path, checkpoint: str | Path, config: str) -> Validation | None:
    """`checkpoint` sampled on `config`'s validation probes with its token gates forced to the truth (`cologen eval
    shapeworld --true-gates --skip-learned`: what a perfect localiser would give; the learned rows are the final
    validation's) into `folder`, run only when the folder has no
    scores of this checkpoint yet; None without the checkpoint."""
    from cologen.model.presets import file_sha256

    if not Path(checkpoint).is_file():
        return None
    return _scored_once(folder, CHECKPOINT_STAMP, file_sha256(Path(checkpoint)),
                        ["--ckpt", str(checkpoint), "--true-gates", "--skip-learned", "--config", config],
                        "sampling the checkpoint with the true gates")


def task_experts(validations: Sequence[Validation]) -> dict[str, int]:
    """Task -> the curriculum step (expert) that introduced it, as the run's last validation recorded it."""
    for v in reversed(validations):
        if v.metrics.get("task_experts"):
            return {k: int(x) for k, x in v.metrics["task_experts"].items()}
    return {}


def after_own_step(validations: Sequence[Validation], task: str) -> Validation | None:
    """The validation that closed the curriculum step which trained `task`'s expert (its last one, if several)."""
    owner = task_experts(validations).get(task)
    matching = [v for v in validations if owner is not None and v.curriculum_step == owner]
    return matching[-1] if matching else None


def estimate(runs: Sequence[Validation | None], task: str, metric: str, routing: str = "learned") -> Estimate:
    """Mean and 95% interval of one metric over several runs (seeds): a two-level bootstrap (runs, probes)."""
    return bootstrap_ci([v.scores(task, metric, routing) for v in runs if v is not None])


def ratio(numerator: Estimate, denominator: Estimate) -> float:
    """numerator / denominator, NaN (shown as n/a) when the denominator's 95% interval reaches 0: a ratio to a score
    not told apart from zero (a hit rate of 1 probe in 64) says nothing."""
    if not (math.isfinite(numerator.mean) and math.isfinite(denominator.mean)) or denominator.mean <= 0:
        return float("nan")
    if math.isfinite(denominator.low) and denominator.low <= 0:
        return float("nan")
    return numerator.mean / denominator.mean
