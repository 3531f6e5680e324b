"""The README's results tables come from the runs' files: `cologen.report` reads validations (per-probe scores after
each curriculum step, oracle routing at the end) and `cologen eval` output, and rewrites the marked README blocks;
`cologen eval` scores a checkpoint or the base alone."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cologen import report
from cologen.eval.results import HEADLINE_METRICS, ratio, read_validations
from cologen.metrics.stats import bootstrap_ci
from cologen.sweep import Trial, load_sweep, write_table

REPO = Path(__file__).resolve().parent.parent


def write_validation(folder: Path, step: int, task_experts: dict, scores: dict, oracle: dict | None = None):
    """A validation folder as SampleValidation writes it: scores {task: {metric: [per probe]}}."""
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"curriculum_step": step, "task_experts": task_experts}))
    lines = []
    for routing, table in (("learned", scores), ("oracle", oracle or {})):
        for task, metrics in table.items():
            n = len(next(iter(metrics.values())))
            for i in range(n):
                lines.append({"task": task, "index": i, "routing": routing,
                              **{f"{task}/{m}": v[i] for m, v in metrics.items()}})
    (folder / "scores.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def full(value: float, n: int = 4) -> dict:
    return {m: [value + 0.01 * i for i in range(n)] for ms in HEADLINE_METRICS.values() for m in ms}


def test_report_builds_the_curriculum_table_from_the_run_files(tmp_path):
    owners = {"inpainting": 0, "grounding": 1, "control": 2, "customized": 3, "editing": 4}
    runs = tmp_path / "runs"
    write_validation(runs / "stage1" / "validation" / "step000100", 0, {"inpainting": 0},
                     {"inpainting": full(0.9)})
    write_validation(runs / "stage1" / "validation" / "step000200", 1, {"inpainting": 0, "grounding": 1},
                     {"grounding": full(0.6)})
    write_validation(runs / "stage2" / "validation" / "step000100", 2, dict(list(owners.items())[:3]),
                     {"control": full(0.5)})
    write_validation(runs / "stage3" / "validation" / "step000100", 3, dict(list(owners.items())[:4]),
                     {"customized": full(0.7)})
    final_scores = {t: full(0.8) for t in owners}
    final_scores["editing"]["objects_kept"] = [0.4, 0.5, 0.6, 0.5]  # a detail metric: its own row, no goal
    write_validation(runs / "stage3" / "validation" / "step000200", 4, owners, final_scores,
                     oracle={t: full(0.85) for t in owners})
    base = runs / "base_only"
    base.mkdir()
    (base / "scores.jsonl").write_text("\n".join(json.dumps(
        {"task": t, "index": i, "routing": "learned", **{f"{t}/{m}": 0.1 for m in ms}})
        for t, ms in HEADLINE_METRICS.items() for i in range(3)) + "\n")
    stamp_committed_base(base)
    # stage 3's checkpoint sampled with the true gates (already scored: its stamp names this checkpoint)
    (runs / "stage3" / "last.ckpt").write_bytes(b"a checkpoint")
    gates = runs / "true_gates"
    gates.mkdir()
    (gates / "scores.jsonl").write_text("\n".join(json.dumps(
        {"task": t, "index": i, "routing": r, **{f"{t}/{m}": v for m in ms}})
        for t, ms in HEADLINE_METRICS.items() for i in range(3) for r, v in (("learned", 0.8), ("true_gates", 0.95)))
        + "\n")
    stamp_checkpoint(gates, runs / "stage3" / "last.ckpt")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:curriculum -->\nold\n<!-- /results:curriculum -->\nmiddle\n"
                      "<!-- results:ablation -->\nold\n<!-- /results:ablation -->\n"
                      "<!-- results:sweep -->\nkept sweep\n<!-- /results:sweep -->\nend\n")
    args = ["--runs", str(runs), "--ablation", str(tmp_path / "none.json"), "--readme", str(readme),
            "--out", str(tmp_path / "docs" / "results.md"), "--sweep", str(tmp_path / "sweep" / "trials.csv")]
    assert report.main(args) == 0
    assert "\nkept sweep\n" in readme.read_text()  # no sweep run: its table is left as it is
    text = readme.read_text()
    assert text.startswith("intro\n") and "\nmiddle\n" in text and text.endswith("end\n") and "\nold\n" not in text
    numbers = json.loads((tmp_path / "docs" / "results.json").read_text())
    cell = numbers["inpainting/psnr_out"]
    assert cell["base_only"]["mean"] == pytest.approx(0.1)
    assert cell["after_own_step"]["mean"] == pytest.approx(0.915)  # step 0's validation: 0.9 + 0.015
    assert cell["final"]["mean"] == pytest.approx(0.815) and cell["oracle"]["mean"] == pytest.approx(0.865)
    assert cell["forgetting_ratio"] == pytest.approx(0.815 / 0.915)
    assert numbers["grounding/hit@0.5"]["after_own_step"]["mean"] == pytest.approx(0.615)
    row = next(line for line in text.splitlines() if line.startswith("| inpainting PSNR outside"))
    assert row.startswith("| inpainting PSNR outside the mask (dB) | 0.1 ± 0.0 | 0.9 ± ") and "| 35.0 |" in row
    assert "| 0.9 ± 0.0 | 35.0 |" in row  # the true gates' column (0.95 on every probe), before the goal
    assert cell["true_gates"]["mean"] == pytest.approx(0.95)
    assert "| oracle routing | true gates | goal |" in text
    assert "no ablation results yet" in text
    kept = next(line for line in text.splitlines() if line.startswith("| editing objects kept"))
    assert kept.startswith("| editing objects kept outside the edit | n/a | 0.50 ± ") and "| **0.50 ± " in kept
    assert numbers["editing/objects_kept"]["goal"] is None
    assert len(read_validations(runs / "stage3")) == 2

    # the sweep's table as `make sweep` writes it (best first), its plot copied next to docs/results.md
    config = load_sweep(REPO / "experiments" / "sweeps" / "gate_temperature.yaml")
    keys = ["val_metrics/control/ssim", "val_metrics/inpainting/psnr_out", "val/routing_entropy"]
    trials = [Trial(f"run{i}", {"model.prw.router.temperature": t, "model.veteran.rho": 0.6}, [], returncode=0,
                    seconds=60.0 * (i + 1), summary=dict(zip(keys, (ssim, 30.0 + i, 0.1))))
              for i, (t, ssim) in enumerate([(0.5, 0.2), (1.0, 0.4)])]
    (tmp_path / "sweep").mkdir()
    write_table(trials, config, tmp_path / "sweep" / "trials.csv", keys[1:])
    # run1's validation files are there: its scores get their interval over the probes
    write_validation(tmp_path / "sweep" / "run1" / "validation" / "step000300", 1, {"inpainting": 0, "control": 1},
                     {"control": {"ssim": [0.3, 0.4, 0.5]}, "inpainting": {"psnr_out": [30.0, 31.0, 32.0]}})
    (tmp_path / "sweep" / "trials.png").write_bytes(b"png")
    assert report.main(args) == 0
    text = readme.read_text()
    rows = [line for line in text.split("<!-- results:sweep -->")[1].splitlines() if line.startswith("| ")]
    assert rows[0] == ("| temperature | rho | control SSIM (the metric) | inpainting PSNR outside (dB) | router entropy "
                       "| s |")
    assert rows[2] == "| 0.5 | 0.6 | 0.200 | 30.0 | 0.100 | 60 |"
    cells = rows[1].split(" | ")
    assert cells[:2] == ["| 1.0", "0.6"] and cells[2].startswith("0.400 ± 0.") and cells[3].startswith("31.0 ± ")
    assert "2 trials, 3 min of trials in all" in text and "kept sweep" not in text
    assert "](docs/images/sweep_gate_temperature.png)" in text
    assert (tmp_path / "docs" / "images" / "sweep_gate_temperature.png").read_bytes() == b"png"
    assert "](images/sweep_gate_temperature.png)" in (tmp_path / "docs" / "results.md").read_text()


def test_report_without_runs_says_what_to_run(tmp_path, capsys):
    base = tmp_path / "runs" / "base_only"
    base.mkdir(parents=True)
    (base / "scores.jsonl").write_text(json.dumps({"task": "inpainting", "index": 0, "inpainting/psnr_out": 1}) + "\n")
    stamp_committed_base(base)
    assert report.main(["--runs", str(tmp_path / "runs"), "--readme", str(tmp_path / "README.md")]) == 2
    assert "make stage1 stage2 stage3" in capsys.readouterr().err


def test_report_rewrites_only_the_tables_asked_for(tmp_path):
    """`--tables ablation`: no stage runs needed; the curriculum and sweep blocks stay as the README has them, and
    docs/results.md is built from the README's blocks (the curriculum's numbers file is left alone)."""
    readme = tmp_path / "README.md"
    blocks = {name: f"<!-- results:{name} -->\nold {name} table\n<!-- /results:{name} -->" for name in report.TABLES}
    readme.write_text("# x\n\n" + "\n\n".join(blocks.values()) + "\n\nthe rest\n")
    est = {"mean": 0.5, "low": 0.4, "high": 0.6, "n": 64}
    (tmp_path / "ablation.json").write_text(json.dumps({"curriculum": {"seeds": 2, "steps": [4200], "seconds": 600.0, "metrics": {
        f"{t}/{m}": {"final": est} for t, ms in HEADLINE_METRICS.items() for m in ms}}}))
    out = tmp_path / "docs" / "results.md"
    assert report.main(["--tables", "ablation", "--runs", str(tmp_path / "no_runs"), "--readme", str(readme),
                        "--ablation", str(tmp_path / "ablation.json"), "--out", str(out)]) == 0
    text = readme.read_text()
    assert "old curriculum table" in text and "old sweep table" in text and "old ablation table" not in text
    assert "| curriculum | 2 | 4200 | 0.5 ± 0.1 | 0.50 ± 0.10 |" in text and text.endswith("the rest\n")
    assert not (tmp_path / "no_runs").exists() and not out.with_suffix(".json").exists()
    results = out.read_text()
    assert "old curriculum table" in results and "| curriculum | 2 |" in results and "old sweep table" in results


def test_two_level_bootstrap_covers_seeds_and_probes():
    one = bootstrap_ci([[1.0, 2.0, 3.0, 4.0]])
    assert one.mean == 2.5 and one.low < 2.5 < one.high and one.n == 4
    spread = bootstrap_ci([[1.0, 1.1, 0.9], [3.0, 3.1, 2.9]])  # two seeds far apart: a wide interval
    tight = bootstrap_ci([[2.0, 2.1, 1.9], [2.0, 2.1, 1.9]])
    assert spread.mean == pytest.approx(2.0) and (spread.high - spread.low) > 5 * (tight.high - tight.low)
    assert bootstrap_ci([[float("nan")]]).n == 0


def test_a_ratio_to_a_score_not_told_apart_from_zero_is_not_given():
    """Forgetting and routing ratios divide by a reference score; 1 hit in 64 probes is no reference."""
    hits = bootstrap_ci([[1.0] + [0.0] * 63])
    assert hits.low == 0.0 and hits.mean > 0
    assert math.isnan(ratio(bootstrap_ci([[1.0, 1.0] + [0.0] * 62]), hits))
    iou = bootstrap_ci([[0.1, 0.12, 0.08, 0.11] * 16])
    assert ratio(bootstrap_ci([[0.05] * 64]), iou) == pytest.approx(0.05 / iou.mean)


@pytest.mark.timeout(300)
def test_cologen_eval_scores_the_base_and_names_missing_data(shapeworld_dir, tmp_path):
    out = tmp_path / "eval"
    done = subprocess.run([sys.executable, "-m", "cologen.cli", "eval", "shapeworld", "--base", "--data",
                           str(shapeworld_dir),
                           "--tasks", "inpainting", "customized", "--probes", "3", "--steps", "2", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [(line["task"], line["index"]) for line in lines] == [(t, i) for t in ("inpainting", "customized")
                                                                 for i in range(3)]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"learned/inpainting/psnr_out", "learned/customized/subject_score"} <= set(metrics)
    assert "learned/inpainting/psnr_out" in done.stdout
    assert "| learned/inpainting/psnr_out |" in (out / "table.md").read_text()
    missing = subprocess.run([sys.executable, "-m", "cologen.cli", "eval", "shapeworld", "--base", "--data",
                              str(tmp_path / "no")],
                             capture_output=True, text=True, cwd=REPO)
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "make data" in missing.stderr


def test_eval_base_takes_a_base_folder_and_names_one_without_weights(tmp_path):
    """`--base FOLDER` scores a saved base (a `make base-gpu` run's, say) before it replaces the committed one."""
    from cologen.commands.evaluate import load_module
    from cologen.model.presets import TinyPreset, save_tiny_base

    committed = load_module(None).model.transformer.state_dict()
    other = TinyPreset(base=None, seed=3).build(load_text_encoder=False).transformer
    save_tiny_base(other, tmp_path / "base")
    loaded = load_module(None, str(tmp_path / "base")).model.transformer.state_dict()
    expected = other.state_dict()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert not all(torch.equal(loaded[k], committed[k]) for k in expected)
    missing = subprocess.run([sys.executable, "-m", "cologen.cli", "eval", "shapeworld", "--base", str(tmp_path)],
                             capture_output=True, text=True, cwd=REPO)
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "holds no model.safetensors" in missing.stderr


def test_eval_builds_probes_with_the_training_configs_builder(shapeworld_dir, tmp_path):
    """The base-only column must score the curriculum's own validation probes: same builder settings."""
    from cologen.commands.evaluate import builder_from_config, load_probes
    from cologen.errors import MissingInput

    builder = builder_from_config(str(REPO / "experiments/tiny/curriculum.yaml"))
    assert builder["box_thickness"] == 2 and builder["overlay_kinds"]["class_boxes"] == 0
    assert builder_from_config(None) == {}
    with pytest.raises(MissingInput, match="does not exist"):
        builder_from_config(str(tmp_path / "nope.yaml"))
    thin = load_probes(str(shapeworld_dir), ["grounding"], 4)["grounding"]
    thick = load_probes(str(shapeworld_dir), ["grounding"], 4, builder=builder)["grounding"]
    assert [p["key"] for p in thin] == [p["key"] for p in thick]
    assert any(not torch.equal(a["target"], b["target"]) for a, b in zip(thin, thick))  # outlines drawn 2 px wide


def stamp_committed_base(folder) -> None:
    """Mark a folder's base-only scores as the committed base's (score_base rescores any other)."""
    from cologen.eval.results import BASE_STAMP
    from cologen.model.presets import TINY_BASE_DIR

    (folder / BASE_STAMP).write_text((TINY_BASE_DIR / "sha256").read_text())


def stamp_checkpoint(folder, checkpoint) -> None:
    """Mark a folder's true-gate scores as `checkpoint`'s (score_true_gates samples any other again)."""
    from cologen.eval.results import CHECKPOINT_STAMP
    from cologen.model.presets import file_sha256

    (folder / CHECKPOINT_STAMP).write_text(file_sha256(checkpoint) + "\n")


def test_the_true_gates_are_sampled_again_for_another_checkpoint_and_not_without_one(tmp_path, monkeypatch):
    from cologen.eval import results
    from cologen.eval.results import score_true_gates

    folder, ckpt = tmp_path / "true_gates", tmp_path / "last.ckpt"
    calls = []
    monkeypatch.setattr(results.subprocess, "check_call", lambda cmd: calls.append(cmd))
    assert score_true_gates(folder, ckpt, "experiments/tiny/curriculum.yaml") is None and calls == []  # no ckpt
    ckpt.write_bytes(b"one")
    folder.mkdir()
    (folder / "scores.jsonl").write_text(json.dumps({"task": "grounding", "index": 0, "routing": "true_gates"}) + "\n")
    stamp_checkpoint(folder, ckpt)
    assert score_true_gates(folder, ckpt, "experiments/tiny/curriculum.yaml") is not None and calls == []
    ckpt.write_bytes(b"another")  # a new staged run
    score_true_gates(folder, ckpt, "experiments/tiny/curriculum.yaml")
    assert calls[-1][calls[-1].index("shapeworld"):][:4] == ["shapeworld", "--ckpt", str(ckpt), "--true-gates"]
    assert len(calls) == 1
    score_true_gates(folder, ckpt, "experiments/tiny/curriculum.yaml")  # now stamped with this one's digest
    assert len(calls) == 1


def test_the_base_is_scored_again_when_the_committed_base_changed(tmp_path, monkeypatch):
    """`make report` / `make ablation` keep the base-only scores of the committed base; scores of another base
    (`make base` or `make base-continue` replaced it), or of an unnamed one, are scored again."""
    from cologen.eval import results
    from cologen.eval.results import BASE_STAMP, score_base
    from cologen.model.presets import TINY_BASE_DIR

    folder = tmp_path / "base_only"
    folder.mkdir()
    (folder / "scores.jsonl").write_text(json.dumps({"task": "inpainting", "index": 0, "inpainting/psnr_out": 1}) + "\n")
    calls = []
    monkeypatch.setattr(results.subprocess, "check_call", lambda cmd: calls.append(cmd))
    stamp_committed_base(folder)
    assert score_base(folder, "experiments/tiny/curriculum.yaml") is not None and calls == []
    for stale in ("0" * 64 + "\n", None):
        if stale is None:
            (folder / BASE_STAMP).unlink()
        else:
            (folder / BASE_STAMP).write_text(stale)
        score_base(folder, "experiments/tiny/curriculum.yaml")
        assert calls[-1][calls[-1].index("shapeworld"):][:2] == ["shapeworld", "--base"]
        assert (folder / BASE_STAMP).read_text() == (TINY_BASE_DIR / "sha256").read_text()  # now the committed one's
    assert len(calls) == 2
