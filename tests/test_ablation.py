"""`make ablation` on a 2-step toy budget: the driver trains every (variant, seed), skips finished runs, resumes an
interrupted one from its last.ckpt, and writes the table (markdown + JSON) and the plot; `cologen.report` turns
runs into the README's tables."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from cologen import ablation
from cologen import report as report_module
from cologen.curriculum.spec import CurriculumSpec, CurriculumStep
from cologen.eval.results import HEADLINE_METRICS, read_validations
from cologen.model.config import PRWConfig
from cologen.training.config import OptimConfig, VeteranConfig

REPO = Path(__file__).resolve().parent.parent
TASKS = ("inpainting", "grounding")
# the shipped variants that change one thing on today's curriculum or on grounding_replay25 (the curriculum until
# 2026-12-06, whose steps differ only in grounding's replay share), so the "recorded before" tests below find the
# curriculum's model settings in them; every other variant layers an earlier curriculum back
ON_TODAYS_CURRICULUM = ("curriculum", "paper_routing", "cotrain", "no_pretrain", "alpha0", "no_replay",
                        "grounding_replay25", "paper_routing_replay25", "alpha0_replay25", "no_replay_replay25",
                        "replay10", "control_1400", "customized_2000", "detached_router", "customized_2000_detached")


def shrink(shapeworld_dir: Path, steps: list[dict]) -> dict:
    """A toy version of the tiny curriculum: a small random model, the test data, a few steps, 3 probes."""
    return {
        "trainer": {"val_check_interval": 2, "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                                "init_args": {"save_dir": "${trainer.default_root_dir}", "name": "logs"}}],
                    "callbacks": [
                        {"class_path": "cologen.training.run_checkpoint.RunCheckpoint",
                         "init_args": {"dirpath": "${trainer.default_root_dir}", "save_last": True,
                                       "every_n_train_steps": 1, "save_top_k": 1}},
                        {"class_path": "cologen.callbacks.SampleValidation",
                         "init_args": {"probes_per_task": 3, "steps": 2, "scope": "curriculum", "oracle": True}}]},
        "model": {"preset": {"init_args": {"base": None, "width": 64, "heads": 2, "double_layers": 1,
                                           "single_layers": 2}},
                  "prw": {"rank": 4, "alpha": 8, "router": {"entry_warmup_steps": 1}}},
        "data": {"init_args": {
            "train_shards": {t: str(shapeworld_dir / t / "train-*.tar") for t in TASKS},
            "val_shards": {t: str(shapeworld_dir / t / "val-*.tar") for t in TASKS}, "val_tasks": list(TASKS),
            "batch_size": 4, "num_workers": 0, "val_samples_per_task": 3, "val_batch_size": 3}},
        "curriculum": {"spec": {"steps": steps, "run_steps": None}},
    }


@pytest.fixture(scope="module")
def toy_ablation(shapeworld_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    curriculum = [{"name": "inpainting", "mixture": {"inpainting": 1.0}, "steps": 2, "rho": 1.0, "alpha": 0.0},
                  {"name": "grounding", "mixture": {"grounding": 0.75, "inpainting": 0.25}, "steps": 2}]
    cotrain = [{"name": "cotrain", "mixture": {"inpainting": 1.0, "grounding": 1.0}, "steps": 4, "rho": 1.0,
                "alpha": 0.0}]
    (root / "shrink.yaml").write_text(yaml.safe_dump(shrink(shapeworld_dir, curriculum)))
    (root / "shrink_cotrain.yaml").write_text(yaml.safe_dump({"curriculum": {"spec": {"steps": cotrain}}}))
    # the base's scores as `cologen eval shapeworld --base --out` writes them (the driver scores it when missing)
    (root / "base_only").mkdir()
    (root / "base_only" / "scores.jsonl").write_text("\n".join(json.dumps(
        {"task": t, "index": i, "routing": "learned", **{f"{t}/{m}": 0.25 for m in ms}})
        for t, ms in HEADLINE_METRICS.items() for i in range(3)) + "\n")
    from cologen.eval.results import BASE_STAMP
    from cologen.model.presets import TINY_BASE_DIR

    (root / "base_only" / BASE_STAMP).write_text((TINY_BASE_DIR / "sha256").read_text())  # scored on the committed base
    # a table written before records were kept: a variant's row (shown beside the recorded ones) and a reference
    # row (left out: references are rebuilt from the records)
    est = {"mean": 0.5, "low": 0.4, "high": 0.6, "n": 64}
    old_row = {"description": "seed 0, before records", "seeds": 1, "seconds": 60.0,
               "metrics": {f"{t}/{m}": {"final": est, "oracle": est, "after_own_step": est, "forgetting_ratio": 1.0,
                                        "routing_ratio": 47.6} for t, ms in HEADLINE_METRICS.items() for m in ms}}
    (root / "snapshot.json").write_text(json.dumps({"cotrain": old_row, "base only": {**old_row, "reference": True}}))
    spec = {
        "configs": ["experiments/tiny/curriculum.yaml", str(root / "shrink.yaml")],
        "seeds": [0, 1],
        "out": str(root / "runs"),
        "base": str(root / "base_only"),
        "records": str(root / "records"),
        "snapshot": str(root / "snapshot.json"),
        "report": str(root / "docs" / "ablation.md"),
        "variants": {
            "curriculum": {"description": "the toy curriculum"},
            "cotrain": {"configs": ["experiments/tiny/cotrain.yaml", str(root / "shrink_cotrain.yaml")],
                        "description": "one expert, both tasks"},
        },
    }
    (root / "ablation.yaml").write_text(yaml.safe_dump(spec))
    return root


@pytest.mark.timeout(600)
def test_ablation_trains_skips_resumes_and_reports(toy_ablation, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    config = str(toy_ablation / "ablation.yaml")
    assert ablation.main([config, "--seeds", "0"]) == 0
    spec = ablation.AblationSpec.load(config)
    for variant in ("curriculum", "cotrain"):
        run = spec.run_dir(variant, 0)
        assert json.loads((run / "done.json").read_text())["returncode"] == 0
        assert (run / "last.ckpt").is_file()
    assert not spec.run_dir("curriculum", 1).exists()  # --seeds selected seed 0 only

    # the table, its numbers and the plot
    report = toy_ablation / "docs" / "ablation.md"
    text = report.read_text()
    assert "| curriculum | 1 | 4 |" in text and "| cotrain | 1 | 4 |" in text and "do not edit by hand" in text
    assert "Seeds not yet trained" in text and "curriculum (1 of 2 seeds)" in text  # a partial table says so
    table = json.loads(report.with_suffix(".json").read_text())
    cell = table["curriculum"]["metrics"]["inpainting/psnr_out"]
    assert cell["final"]["n"] == 3 and cell["oracle"]["n"] == 3 and cell["after_own_step"]["n"] == 3
    assert table["cotrain"]["metrics"]["grounding/hit@0.5"]["final"]["n"] == 3
    assert table["curriculum"]["steps"] == table["cotrain"]["steps"] == [4]  # the optimizer steps its seeds trained
    assert set(table["curriculum"]["metrics"]) == {f"{t}/{m}" for t, ms in HEADLINE_METRICS.items() for m in ms}
    assert report.with_suffix(".png").stat().st_size > 0

    # the snapshot's variant row stands after the recorded one, marked; its reference row is not taken
    names = list(table)
    assert names.index("cotrain, snapshot") == names.index("cotrain") + 1 and "base only, snapshot" not in names
    assert table["cotrain, snapshot"]["snapshot"] and table["cotrain, snapshot"]["seconds"] == 60.0
    assert table["cotrain, snapshot"]["metrics"]["grounding/box_iou"]["routing_ratio"] == 1.0  # its estimates' ratio
    assert table["base only"]["metrics"]["inpainting/psnr_out"]["final"]["mean"] == pytest.approx(0.25)
    # a snapshot row's steps were not recorded
    assert "| cotrain, snapshot | 1 |  | 0.50 ± 0.10 |" in text and "Rows named '..., snapshot'" in text

    # the reference rows: the base alone and the first variant with oracle routing (scores, no runtime)
    base = table["base only"]
    assert base["reference"] and base["metrics"]["inpainting/psnr_out"]["final"]["mean"] == pytest.approx(0.25)
    oracle = table["curriculum, oracle routing"]
    assert oracle["reference"] and oracle["seeds"] == 1
    assert oracle["metrics"]["grounding/box_iou"]["final"] == table["curriculum"]["metrics"]["grounding/box_iou"]["oracle"]
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert any(r.startswith("| base only |  |  | 0.25 ± 0.00 |") and r.endswith("|  |") for r in rows)
    ratios = text.split("Forgetting")[1].split("Variants:")[0]
    assert "| curriculum |" in ratios and "base only" not in ratios and "oracle routing |" not in ratios
    readme_rows = report_module.ablation_table(report.with_suffix(".json")).splitlines()
    assert any(r.startswith("| base only |  | ") and "| 0.25 ± 0.00 |" in r and r.endswith("|  |") for r in readme_rows)
    assert any(r.startswith("| curriculum, oracle routing | 1 |") for r in readme_rows)

    # every finished run left a record: its validations (scores gzipped) and its runtime with the machine
    record = spec.record_dir("curriculum", 0)
    done = json.loads((record / "done.json").read_text())
    assert done["returncode"] == 0 and done["machine"]["cpu_count"] >= 1 and done["machine"]["vector_extension"]
    recorded = sorted(p.name for p in (record / "validation").iterdir())
    assert recorded == sorted(p.name for p in (spec.run_dir("curriculum", 0) / "validation").iterdir())
    assert all((record / "validation" / s / "scores.jsonl.gz").is_file() for s in recorded)
    assert not list(record.rglob("*.ckpt")) and not list(record.rglob("*.png"))  # small enough to commit
    again = ablation.save_record(spec.run_dir("curriculum", 0), toy_ablation / "again" / "seed0")
    assert [p.read_bytes() for p in sorted(again.rglob("*.*"))] == [p.read_bytes() for p in sorted(record.rglob("*.*"))]
    assert "run records under" in text and "measured on: " in text
    assert done["base"] == "random"  # the toy's preset starts from random weights

    # a seed trained from another base is a row of its own, never pooled with the others
    other = spec.record_dir("curriculum", 1)
    shutil.copytree(record, other)
    (other / "done.json").write_text(json.dumps({**done, "seed": 1, "base": "ab" * 32}) + "\n")
    split = ablation.aggregate(spec)
    assert split["curriculum"]["seeds"] == 1 and "base" not in split["curriculum"]
    assert split["curriculum, base abababab"]["seeds"] == 1 and split["curriculum, base abababab"]["base"] == "ab" * 32
    assert "Rows named '..., base" in ablation.markdown(split, spec, "make ablation")
    names = list(ablation.with_snapshot(spec, split))
    assert names.index("curriculum, base abababab") == names.index("curriculum") + 1
    legacy = {k: v for k, v in done.items() if k != "base"}  # recorded before done.json named its base
    (other / "done.json").write_text(json.dumps({**legacy, "seed": 1}) + "\n")
    assert f"curriculum, base {ablation.EARLIER_BASE[:8]}" in ablation.aggregate(spec)
    shutil.rmtree(other)

    # finished runs are skipped, also one whose run folder is gone (trained on another machine): its record counts,
    # and the table built from the records alone is the same
    shutil.rmtree(spec.run_dir("curriculum", 0))

    def no_training(*args, **kwargs):
        raise AssertionError(f"a finished run was started again: {args}")

    monkeypatch.setattr(subprocess, "call", no_training)
    assert ablation.main([config, "--seeds", "0"]) == 0
    assert json.loads(report.with_suffix(".json").read_text()) == table
    monkeypatch.undo()
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("WANDB_MODE", "disabled")

    # an interrupted run (no done.json yet, no record, a last.ckpt) resumes from its checkpoint
    run = spec.run_dir("cotrain", 0)
    (run / "done.json").unlink()
    shutil.rmtree(spec.record_dir("cotrain", 0))
    variant = next(v for v in spec.variants if v.name == "cotrain")
    command = ablation.run_command(spec, variant, 0)
    assert command[-2:] == ["--ckpt_path", str(run / "last.ckpt")]
    assert ablation.main([config, "--seeds", "0", "--configs", "cotrain"]) == 0
    assert (run / "done.json").is_file()

    # a run finished from another base than its variant loads now (the base was replaced) is set aside, record and
    # run folder with its checkpoints, the seed trains again, and both stay in the table, each a row of its own
    record, run = spec.record_dir("curriculum", 0), spec.run_dir("curriculum", 0)
    shutil.copytree(spec.run_dir("cotrain", 0), run)  # the run folder removed above, now back with its checkpoint
    old = {**json.loads((record / "done.json").read_text()), "base": "cd" * 32}
    for folder in (record, run):
        (folder / "done.json").write_text(json.dumps(old) + "\n")
    trained = []

    def retrain(cmd):
        trained.append(cmd)
        out = Path(cmd[cmd.index("--trainer.default_root_dir") + 1])
        assert "--ckpt_path" not in cmd and not list(out.iterdir())  # a fresh start, not the old base's run resumed
        shutil.copytree(spec.set_aside_dir(spec.out, "curriculum", 0, "cd" * 32) / "validation", out / "validation")
        return 0

    monkeypatch.setattr(subprocess, "call", retrain)
    assert ablation.main([config, "--seeds", "0", "--configs", "curriculum"]) == 0
    assert len(trained) == 1
    kept = spec.set_aside("curriculum", 0)
    assert kept == [spec.set_aside_dir(spec.records, "curriculum", 0, "cd" * 32)]
    assert json.loads((kept[0] / "done.json").read_text())["base"] == "cd" * 32
    assert (spec.set_aside_dir(spec.out, "curriculum", 0, "cd" * 32) / "last.ckpt").is_file()
    assert json.loads((record / "done.json").read_text())["base"] == "random"  # the seed's new record
    rows = ablation.aggregate(spec)
    assert rows["curriculum"]["seeds"] == 1 and rows["curriculum, base cdcdcdcd"]["seeds"] == 1
    assert ablation.main([config, "--seeds", "0", "--configs", "curriculum"]) == 0 and len(trained) == 1  # done now


def test_a_stopped_driver_stops_its_attempt_and_still_counts_its_time(tmp_path, monkeypatch):
    """`kill` on the driver (SIGTERM) ends the training attempt with it and adds the attempt's seconds to the run's
    running total, so a run stopped and resumed records its whole training time."""
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"variants": {"x": {}}, "out": str(tmp_path / "runs")}))
    spec = ablation.AblationSpec.load(tmp_path / "a.yaml")
    child_pid = tmp_path / "child.pid"
    script = f"import os, time; open({str(child_pid)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    monkeypatch.setattr(ablation, "run_command", lambda spec, variant, seed: [sys.executable, "-c", script])
    timing = spec.run_dir("x", 0) / "seconds.json"
    timing.parent.mkdir(parents=True)
    timing.write_text(json.dumps({"seconds": 100.0}))  # an earlier attempt's

    def stop_when_training():
        while not child_pid.is_file() or not child_pid.read_text():
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_training, daemon=True).start()
    with pytest.raises(SystemExit) as stopped:
        ablation.run_one(spec, spec.variants[0], 0)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert 100.5 <= json.loads(timing.read_text())["seconds"] < 160  # this attempt's time added, not lost
    assert not (spec.run_dir("x", 0) / "done.json").exists()  # unfinished: the next invocation resumes it
    with pytest.raises(ProcessLookupError):  # the attempt was stopped with its driver
        os.kill(int(child_pid.read_text()), 0)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the driver's only while it trains


def test_ablation_file_errors_name_the_problem(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"variants": {"x": {"configs": ["missing.yaml"]}}}))
    assert ablation.main([str(tmp_path / "a.yaml")]) == 2
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"variants": {"x": {}}, "snapshot": "gone.json"}))
    assert ablation.main([str(tmp_path / "c.yaml")]) == 2
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"variants": {"x": {}}, "seed": [1]}))
    with pytest.raises(ValueError, match=r"unknown keys \['seed'\]"):
        ablation.AblationSpec.load(tmp_path / "b.yaml")


def test_the_shipped_ablation_file_has_the_asked_variants():
    spec = ablation.AblationSpec.load(REPO / "experiments" / "ablation" / "tiny.yaml")
    names = {v.name for v in spec.variants}
    assert {"curriculum", "paper_routing", "cotrain", "no_pretrain", "alpha0", "no_replay"} <= names
    assert len(spec.seeds) >= 3 and all(v.description for v in spec.variants)


def _layered(files: list[str]) -> dict:
    """The configs merged as LightningCLI's repeated `--config` does: mappings key by key, lists replaced."""
    def merge(into: dict, update: dict) -> dict:
        for key, value in update.items():
            into[key] = merge(dict(into.get(key) or {}), value) if isinstance(value, dict) else value
        return into

    merged: dict = {}
    for f in files:
        merge(merged, yaml.safe_load((REPO / f).read_text()))
    return merged


def _differing_keys(a: dict, b: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key in set(a) | set(b):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            keys |= _differing_keys(x, y, f"{prefix}{key}.")
        elif x != y:
            keys.add(f"{prefix}{key}")
    return keys


def test_the_papers_baselines_change_only_their_own_settings_on_todays_curriculum():
    """The issue's named rows are today's curriculum with one change each (the paper's routing, one co-trained
    expert, stage 3 alone, no veteran loss, no replay), on its budget; the `_replay25` rows are the same changes to the
    curriculum until 2026-12-06 (grounding_replay25: grounding's step replays a quarter), and the rows recorded on
    earlier curricula were relabelled (their records say under which name they ran)."""
    spec = ablation.AblationSpec.load(REPO / "experiments" / "ablation" / "tiny.yaml")
    files = {v.name: spec.configs + v.configs for v in spec.variants}
    curriculum, quarter = _layered(files["curriculum"]), _layered(files["grounding_replay25"])
    papers_routing = {"model.prw.router.prompt_input", "model.prw.router.normalize_input", "model.prw.router.weighting",
                      "model.veteran.task_weight", "model.veteran.teacher_forcing"}
    assert _differing_keys(curriculum, _layered(files["paper_routing"])) == papers_routing
    assert _differing_keys(quarter, _layered(files["paper_routing_replay25"])) == papers_routing
    for baseline in ("cotrain", "no_pretrain"):
        assert _differing_keys(curriculum, _layered(files[baseline])) == {
            "curriculum.spec.steps", "trainer.default_root_dir"}, baseline
        assert _curriculum(files[baseline]).total_steps() == _curriculum(files["curriculum"]).total_steps()
    assert [s.stage for s in _curriculum(files["no_pretrain"]).steps] == [3, 3]
    for name, key in (("alpha0", "curriculum.spec.veteran_alpha"), ("no_replay", "curriculum.spec.replay")):
        assert _differing_keys(curriculum, _layered(files[name])) == {key}
        assert _differing_keys(quarter, _layered(files[f"{name}_replay25"])) == {key}
    assert _differing_keys(curriculum, _layered(files["detached_router"])) == {"model.prw.router.detach_input"}
    assert _differing_keys(_layered(files["customized_2000"]), _layered(files["customized_2000_detached"])) == {
        "model.prw.router.detach_input"}
    for old, name in (("paper_routing_1202", "paper_routing"), ("cotrain_1203", "cotrain"),
                      ("no_pretrain_1203", "no_pretrain"), ("alpha0_1203", "alpha0"), ("no_replay_1203", "no_replay"),
                      ("paper_routing_replay25", "paper_routing"), ("alpha0_replay25", "alpha0"),
                      ("no_replay_replay25", "no_replay")):
        done = [json.loads(p.read_text()) for p in (REPO / "docs" / "ablation_runs" / old).glob("**/done.json")]
        assert len(done) >= 3 and all(d["variant"] == old and d["recorded_as"] == name for d in done), old


def _model_section(files: list[str], section: str) -> dict:
    """model.<section> as the layered configs set it."""
    return _layered(files).get("model", {}).get(section, {})


def _curriculum(files: list[str]) -> CurriculumSpec:
    """curriculum.spec as the layered configs set it (a later file's steps replace an earlier one's)."""
    spec = _layered(files)["curriculum"]["spec"]
    return CurriculumSpec(steps=[CurriculumStep(**s) for s in spec["steps"]], run_steps=None)


def _optim(files: list[str]) -> OptimConfig:
    return OptimConfig(**_model_section(files, "optim"))


def test_the_shipped_variants_train_from_the_committed_base_their_records_name():
    """Every shipped variant loads the committed tiny base (so a record is pooled with its variant's row when it
    names that base)."""
    from cologen.model.presets import TINY_BASE_DIR

    spec = ablation.AblationSpec.load(REPO / "experiments" / "ablation" / "tiny.yaml")
    committed = (TINY_BASE_DIR / "sha256").read_text().strip()
    assert {ablation.configured_base(spec, v) for v in spec.variants} == {committed}
    assert ablation.base_digest(None) == "random" and ablation.base_digest("builtin") == committed


def test_the_shipped_variants_train_on_the_learning_rates_their_records_were_made_with():
    """The curriculum anneals its experts at each step's end and keeps the routers' rate; the variants recorded on
    the constant rate (before the curriculum's cosine) pin it, so their records stay what their files train."""
    spec = ablation.AblationSpec.load(REPO / "experiments" / "ablation" / "tiny.yaml")
    schedules = {v.name: _optim(spec.configs + v.configs) for v in spec.variants}
    as_pairs = {name: (o.schedule, o.router_schedule or o.schedule) for name, o in schedules.items()}
    assert as_pairs["curriculum"] == ("cosine", "constant")
    assert as_pairs["cosine_steps"] == ("cosine", "cosine")
    for name in ("constant_lr", "keep_dropped_sources", "skip_dropped_sources", "task_balance"):
        assert as_pairs[name] == ("constant", "constant"), name
    assert schedules["curriculum"].min_lr_ratio == 0.1


def _routing_and_init(files: list[str]) -> tuple[bool, str]:
    """(model.veteran.teacher_forcing, model.prw.init) as the layered configs set them, else the configs' defaults."""
    forcing = _model_section(files, "veteran").get("teacher_forcing", VeteranConfig.teacher_forcing)
    return forcing, _model_section(files, "prw").get("init", PRWConfig.init)


def test_the_variants_recorded_on_the_earlier_curriculum_still_train_it():
    """The curriculum became teacher-forced with zero-init experts on 2026-12-02; the variants whose seeds were
    recorded before layer both back (routed by the routers, copied experts), so their records stay what they train."""
    spec = ablation.AblationSpec.load(REPO / "experiments" / "ablation" / "tiny.yaml")
    settings = {v.name: _routing_and_init(spec.configs + v.configs) for v in spec.variants}
    assert settings["curriculum"] == (True, "zero")
    assert settings["learned_routing"] == (False, "zero")
    assert settings["copied_experts"] == (True, "copy")
    for name in ("paper_routing", "paper_routing_replay25"):  # routed by the routers in training, zero-init experts
        assert settings[name] == (False, "zero"), name
    for name in ("learned_routing_copied_experts", "constant_lr", "keep_dropped_sources", "paper_routing_1202",
                 "task_balance", "skip_dropped_sources", "cosine_steps", "change_weight4"):
        assert settings[name] == (False, "copy"), name


def test_the_variants_recorded_before_isolation_still_train_without_it():
    """The curriculum keeps what a gate closes as the base's since 2026-12-03 (`prw.isolate_closed_tokens: output`);
    every variant recorded before layers it back off, so its records stay what it trains (and the variants that
    turn hard gates off stay valid configs)."""
    spec = ablation.AblationSpec.load(REPO / "experiments" / "ablation" / "tiny.yaml")
    isolation = {v.name: _model_section(spec.configs + v.configs, "prw").get("isolate_closed_tokens", "none")
                 for v in spec.variants}
    assert {isolation.pop(name) for name in ON_TODAYS_CURRICULUM} == {"output"}
    assert isolation.pop("isolate_source") == "source"
    since = {"no_prompt_gates", "prompt_gates", "prompt_gates_weight_all", "no_gate_encoder", "no_grounding_gates",
             "no_concat", "any_block_opens", "no_gate_referrer", "grounding_1000"}
    assert {isolation.pop(name) for name in since} == {"output"}
    assert set(isolation.values()) == {"none"}, isolation


def test_the_variants_recorded_before_editing_read_the_instruction_still_train_without_it():
    """The curriculum's editing gates are supervised and read the instruction since 2026-12-03 (`prw.gate_prompt`,
    `veteran.gate_prompt_tasks: [editing]`); every variant recorded before layers no_prompt_gates.yaml, so its
    records stay what it trains, and prompt_gates gives every supervised gate the prompt's terms."""
    spec = ablation.AblationSpec.load(REPO / "experiments" / "ablation" / "tiny.yaml")
    files = {v.name: spec.configs + v.configs for v in spec.variants}
    prompt = {name: _model_section(f, "prw").get("gate_prompt", False) for name, f in files.items()}
    veteran = {name: _model_section(f, "veteran") for name, f in files.items()}
    edit, ground = ["inpainting", "editing"], ["inpainting", "editing", "grounding"]
    for name, gated, prompt_tasks in (*((name, ground, ["editing", "grounding"]) for name in ON_TODAYS_CURRICULUM),
                                      ("grounding_1000", ground, ["editing", "grounding"]),
                                      ("no_gate_referrer", ground, ["editing", "grounding"]),
                                      ("any_block_opens", ground, ["editing", "grounding"]),
                                      ("no_concat", ground, ["editing", "grounding"]),
                                      ("no_grounding_gates", edit, ["editing"]), ("no_gate_encoder", edit, ["editing"]),
                                      ("prompt_gates", edit, None), ("prompt_gates_weight_all", edit, None)):
        assert prompt.pop(name) and veteran[name]["gate_prompt_tasks"] == prompt_tasks, name
        assert veteran.pop(name)["gate_tasks"] == gated, name
    assert set(prompt.values()) == {False}, prompt
    assert all(v.get("gate_tasks") == ["inpainting"] and v.get("gate_prompt_tasks") is None
               and v.get("gate_pos_weight") == 1.0 for v in veteran.values()), veteran


def test_the_variants_recorded_before_the_gate_encoder_still_train_without_it():
    """The curriculum's editing gates read the pretrained, frozen gate encoder since 2026-12-04 (`prw.gate_image`,
    `prw.gate_image_encoder: builtin`); every variant recorded before layers no_gate_encoder.yaml or no_prompt_gates.yaml
    (which turns the image terms off with the prompt gates), so its records stay what it trains, and each variant's
    layered prw section is a valid config."""
    spec = ablation.AblationSpec.load(REPO / "experiments" / "ablation" / "tiny.yaml")
    prw = {v.name: _model_section(spec.configs + v.configs, "prw") for v in spec.variants}
    curriculum = prw["curriculum"]
    # grounding_1000, no_gate_referrer, any_block_opens, no_concat and no_grounding_gates were recorded with it
    for with_encoder in [prw.pop(name) for name in (*ON_TODAYS_CURRICULUM, "grounding_1000", "no_gate_referrer",
                                                     "any_block_opens", "no_concat", "no_grounding_gates")]:
        assert with_encoder["gate_image"] and with_encoder["gate_image_encoder"] == "builtin"
    assert all(not p["gate_image"] and p["gate_image_encoder"] is None for p in prw.values()), prw
    for section in (curriculum, *prw.values()):
        PRWConfig(**{k: v for k, v in section.items() if k != "router"})  # raises on a contradiction
    recorded = {p.parent.parent.name for p in (REPO / "docs" / "ablation_runs").glob("*/seed*/done.json")}
    assert "gate_encoder" not in recorded and {"no_concat", "no_gate_encoder"} <= recorded


def test_the_variants_recorded_before_grounding_read_the_expression_still_train_with_its_gates_open():
    """The curriculum's grounding gates are supervised on the overlay's tokens and read the expression since
    2026-12-04 (`veteran.gate_tasks`, `gate_prompt_tasks` and `gate_pos_weight_tasks` name grounding); every variant
    recorded before layers no_grounding_gates.yaml or no_prompt_gates.yaml, so no supervision, prompt term or weight
    reaches grounding's gates in what it trains, and the records were relabelled: the variant grounding_gates's seeds
    are the curriculum's, the curriculum's before them no_grounding_gates's."""
    spec = ablation.AblationSpec.load(REPO / "experiments" / "ablation" / "tiny.yaml")
    files = {v.name: spec.configs + v.configs for v in spec.variants}
    veteran = {name: _model_section(f, "veteran") for name, f in files.items()}
    curriculum = veteran.pop("curriculum")
    assert veteran.pop("cotrain") == veteran.pop("no_pretrain") == curriculum
    assert veteran.pop("alpha0") == veteran.pop("no_replay") == veteran.pop("grounding_replay25") == curriculum
    assert veteran.pop("alpha0_replay25") == veteran.pop("no_replay_replay25") == curriculum
    assert veteran.pop("replay10") == veteran.pop("control_1400") == veteran.pop("customized_2000") == curriculum
    assert veteran.pop("detached_router") == veteran.pop("customized_2000_detached") == curriculum
    for name in ("paper_routing", "paper_routing_replay25"):
        assert {**veteran.pop(name), "task_weight": None, "teacher_forcing": None} == {
            **curriculum, "task_weight": None, "teacher_forcing": None}, name  # its routing alone differs
    assert veteran.pop("grounding_1000") == curriculum  # the curriculum before grounding's 2,000 steps
    assert veteran.pop("no_gate_referrer") == curriculum  # ... before its referrer
    assert veteran.pop("no_concat") == curriculum  # ... before its condition input
    assert veteran.pop("any_block_opens") == curriculum  # ... and before its majority rule
    assert curriculum["gate_tasks"] == ["inpainting", "editing", "grounding"]
    assert curriculum["gate_prompt_tasks"] == curriculum["gate_pos_weight_tasks"] == ["editing", "grounding"]
    for name, section in veteran.items():
        assert "grounding" not in section["gate_tasks"], name  # so a null prompt/weight task list cannot reach it
        for key in ("gate_prompt_tasks", "gate_pos_weight_tasks"):
            assert section[key] is None or "grounding" not in section[key], (name, key)
        open_file = {"experiments/ablation/no_grounding_gates.yaml", "experiments/ablation/no_prompt_gates.yaml"}
        assert open_file & set(files[name]), name
    assert veteran["no_grounding_gates"] == {**curriculum, "gate_tasks": ["inpainting", "editing"],
                                             "gate_prompt_tasks": ["editing"], "gate_pos_weight_tasks": ["editing"]}
    records = REPO / "docs" / "ablation_runs"
    done = {p.parent.parent.name: json.loads(p.read_text()) for p in records.glob("*/seed0/done.json")}
    assert "grounding_gates" not in done
    assert done["no_concat"]["recorded_as"] == "grounding_gates"
    assert done["no_grounding_gates"]["recorded_as"] == "gate_encoder"
    assert all(d["variant"] == name for name, d in done.items()), done


def test_the_variants_recorded_before_the_condition_input_still_train_without_it():
    """The curriculum's experts also map an aligned condition's token to the noisy token at the same place since
    2026-12-05 (`prw.concat_condition`); every variant recorded before layers no_concat.yaml first, so its records stay
    what it trains, and the curriculum's records before then are no_concat's."""
    spec = ablation.AblationSpec.load(REPO / "experiments" / "ablation" / "tiny.yaml")
    concat = {v.name: _model_section(spec.configs + v.configs, "prw").get("concat_condition", False)
              for v in spec.variants}
    assert all(concat.pop(name) is True for name in ON_TODAYS_CURRICULUM) and concat.pop("any_block_opens") is True
    assert concat.pop("no_gate_referrer") is True and concat.pop("grounding_1000") is True
    assert set(concat.values()) == {False}, concat
    assert all(v.configs[3] == "experiments/ablation/no_concat.yaml" for v in spec.variants
               if v.name not in (*ON_TODAYS_CURRICULUM, "any_block_opens", "no_gate_referrer", "grounding_1000"))
    done = {p.parent.parent.name: json.loads(p.read_text())
            for p in (REPO / "docs" / "ablation_runs").glob("*/seed*/done.json")}
    assert done["no_concat"]["variant"] == "no_concat"


def test_the_variants_recorded_before_the_majority_rule_still_train_with_any_block_opening_a_token():
    """A noisy token takes the curriculum's expert velocity where a majority of the blocks' gates open it since
    2026-12-05 (`prw.open_rule: majority`); every variant recorded before layers any_block_opens.yaml first, so its
    records stay what it trains, and the curriculum's records before then are any_block_opens's."""
    spec = ablation.AblationSpec.load(REPO / "experiments" / "ablation" / "tiny.yaml")
    rule = {v.name: _model_section(spec.configs + v.configs, "prw").get("open_rule", "any") for v in spec.variants}
    assert {rule.pop(name) for name in (*ON_TODAYS_CURRICULUM, "no_gate_referrer", "grounding_1000")} == {"majority"}
    assert set(rule.values()) == {"any"}, rule
    assert all(v.configs[2] == "experiments/ablation/any_block_opens.yaml" for v in spec.variants
               if v.name not in (*ON_TODAYS_CURRICULUM, "no_gate_referrer", "grounding_1000"))
    done = {p.parent.parent.name: json.loads(p.read_text())
            for p in (REPO / "docs" / "ablation_runs").glob("*/seed*/done.json")}
    assert done["any_block_opens"]["variant"] == "any_block_opens"
    assert done["any_block_opens"]["recorded_as"] == "curriculum"


def test_the_variants_recorded_before_the_referrer_still_train_without_it():
    """The curriculum's prompt gates read the pretrained, frozen referrer's map since 2026-12-05 (afternoon;
    `prw.gate_referrer: builtin`); every variant recorded before layers no_gate_referrer.yaml first, so its records
    stay what it trains, and the curriculum's records before then are no_gate_referrer's."""
    spec = ablation.AblationSpec.load(REPO / "experiments" / "ablation" / "tiny.yaml")
    referrer = {v.name: _model_section(spec.configs + v.configs, "prw").get("gate_referrer") for v in spec.variants}
    assert {referrer.pop(name) for name in (*ON_TODAYS_CURRICULUM, "grounding_1000")} == {"builtin"}
    assert set(referrer.values()) == {None}, referrer
    assert all(v.configs[1] == "experiments/ablation/no_gate_referrer.yaml" for v in spec.variants
               if v.name not in (*ON_TODAYS_CURRICULUM, "grounding_1000"))
    done = {p.parent.name: json.loads(p.read_text())
            for p in (REPO / "docs" / "ablation_runs" / "no_gate_referrer").glob("seed*/done.json")}
    assert sorted(done) == ["seed0", "seed1", "seed2"]
    assert all(d["variant"] == "no_gate_referrer" and d["recorded_as"] == "curriculum" for d in done.values()), done


def test_the_variants_recorded_before_grounding_got_2000_steps_still_train_their_3200():
    """Grounding's curriculum step trains 2,000 optimizer steps since 2026-12-05 (evening; 4,200 in all, and the
    co-training and no-pretraining baselines the same budget); every variant recorded before layers
    grounding_1000.yaml first (and cotrain_1203 and no_pretrain_1203 their 3,200-step files last), so its records stay what it
    trains, and the curriculum's records before then are grounding_1000's, at 3,200 steps."""
    spec = ablation.AblationSpec.load(REPO / "experiments" / "ablation" / "tiny.yaml")
    budget = {v.name: _curriculum(spec.configs + v.configs).total_steps() for v in spec.variants}
    grounding = {v.name: [s.steps for s in _curriculum(spec.configs + v.configs).steps if s.name == "grounding"]
                 for v in spec.variants}
    assert budget.pop("control_1400") == 5000  # control's step 1,400 steps, not 600
    assert budget.pop("customized_2000") == budget.pop("customized_2000_detached") == 5600  # customized's 2,000
    assert {budget.pop(name) for name in ON_TODAYS_CURRICULUM
            if name not in ("control_1400", "customized_2000", "customized_2000_detached")} == {4200}
    assert [grounding.pop(name) for name in ("curriculum", "paper_routing", "alpha0", "no_replay", "grounding_replay25",
                                             "paper_routing_replay25", "alpha0_replay25", "no_replay_replay25",
                                             "replay10", "control_1400", "customized_2000", "detached_router",
                                             "customized_2000_detached")
            ] == [[2000]] * 13
    assert grounding.pop("cotrain") == grounding.pop("no_pretrain") == []
    assert set(budget.values()) == {3200}, budget
    assert grounding.pop("grounding_budget") == [1400] and grounding.pop("cotrain_1203") == grounding.pop("no_pretrain_1203") == []
    assert set(map(tuple, grounding.values())) == {(1000,)}, grounding
    assert all(v.configs[0] == "experiments/ablation/grounding_1000.yaml" for v in spec.variants
               if v.name not in ON_TODAYS_CURRICULUM)
    records = REPO / "docs" / "ablation_runs" / "grounding_1000"
    done = {p.parent.name: json.loads(p.read_text()) for p in records.glob("seed*/done.json")}
    assert sorted(done) == ["seed0", "seed1", "seed2"]
    assert all(d["variant"] == "grounding_1000" and d["recorded_as"] == "curriculum" for d in done.values()), done
    assert all(read_validations(p.parent)[-1].global_step == 3200 for p in records.glob("seed*/done.json"))


def test_the_variants_recorded_before_grounding_replayed_a_tenth_still_replay_a_quarter():
    """Grounding's curriculum step replays a tenth of inpainting since 2026-12-06 (mixture 0.9 / 0.1, rho 0.9); every
    variant recorded on today's settings before then layers grounding_replay25.yaml first (its steps differ from the
    curriculum's in grounding's mixture and rho alone), so its records stay what it trains; the curriculum's records
    before then are grounding_replay25's, and the curriculum's are the ones recorded as grounding_replay10."""
    spec = ablation.AblationSpec.load(REPO / "experiments" / "ablation" / "tiny.yaml")
    files = {v.name: spec.configs + v.configs for v in spec.variants}
    today, quarter = _curriculum(files["curriculum"]).steps, _curriculum(files["grounding_replay25"]).steps
    assert _differing_keys(_layered(files["curriculum"]), _layered(files["grounding_replay25"])) == {
        "curriculum.spec.steps"}
    assert [s for s in quarter if s.name != "grounding"] == [s for s in today if s.name != "grounding"]
    (tenth,), (quarter_step,) = ([s for s in steps if s.name == "grounding"] for steps in (today, quarter))
    assert (tenth.mixture, tenth.rho) == ({"grounding": 0.9, "inpainting": 0.1}, 0.9)
    assert (quarter_step.mixture, quarter_step.rho) == ({"grounding": 0.75, "inpainting": 0.25}, 0.75)
    assert tenth.steps == quarter_step.steps == 2000
    layers_quarter = {v.name for v in spec.variants if v.configs[:1] == ["experiments/ablation/grounding_replay25.yaml"]}
    assert layers_quarter == {"grounding_replay25", "paper_routing_replay25", "alpha0_replay25", "no_replay_replay25"}
    records = REPO / "docs" / "ablation_runs"
    for variant, recorded_as in (("curriculum", "grounding_replay10"), ("grounding_replay25", "curriculum")):
        done = {p.parent.name: json.loads(p.read_text()) for p in (records / variant).glob("seed*/done.json")}
        assert sorted(done) == ["seed0", "seed1", "seed2"], variant
        assert all(d["variant"] == variant and d["recorded_as"] == recorded_as for d in done.values()), done
    assert not (records / "grounding_replay10").exists()


def test_replay10_gives_every_later_step_a_tenth_of_replay_and_changes_nothing_else():
    """replay10: the steps after grounding's replay a tenth too (the new task 0.9, rho 0.9), split between the same
    earlier tasks as the curriculum's; names, lengths, learning rates and veteran weights as the curriculum's."""
    spec = ablation.AblationSpec.load(REPO / "experiments" / "ablation" / "tiny.yaml")
    files = {v.name: spec.configs + v.configs for v in spec.variants}
    assert _differing_keys(_layered(files["curriculum"]), _layered(files["replay10"])) == {"curriculum.spec.steps"}
    today, tenth = _curriculum(files["curriculum"]).steps, _curriculum(files["replay10"]).steps
    assert tenth[:2] == today[:2]
    for ours, theirs in zip(tenth[2:], today[2:], strict=True):
        assert (ours.name, ours.steps, ours.lr, ours.alpha) == (theirs.name, theirs.steps, theirs.lr, theirs.alpha)
        assert ours.mixture[ours.name] == ours.rho == 0.9 and set(ours.mixture) == set(theirs.mixture)
        assert sum(ours.mixture.values()) == pytest.approx(1.0)
        replayed = [w for task, w in ours.mixture.items() if task != ours.name]
        assert max(replayed) - min(replayed) < 1e-3  # split evenly
    assert _curriculum(files["replay10"]).task_experts(4) == _curriculum(files["curriculum"]).task_experts(4)


@pytest.mark.parametrize(("variant", "task", "steps"), [("control_1400", "control", 1400),
                                                     ("customized_2000", "customized", 2000)])
def test_a_longer_step_variant_lengthens_that_step_alone(variant: str, task: str, steps: int):
    """control_1400 / customized_2000: one task's step longer than the curriculum's 600 optimizer steps; every step's
    name, mixture, rho, learning rate and veteran weight, the other steps' lengths and the model as the curriculum's,
    and every step's end on a validation."""
    spec = ablation.AblationSpec.load(REPO / "experiments" / "ablation" / "tiny.yaml")
    files = {v.name: spec.configs + v.configs for v in spec.variants}
    assert _differing_keys(_layered(files["curriculum"]), _layered(files[variant])) == {"curriculum.spec.steps"}
    spec_today, spec_longer = _curriculum(files["curriculum"]), _curriculum(files[variant])
    today, longer = spec_today.steps, spec_longer.steps
    assert [s.steps for s in longer] == [steps if s.name == task else s.steps for s in today]
    assert [replace(s, steps=0) for s in longer] == [replace(s, steps=0) for s in today]
    interval = _layered(files[variant])["trainer"]["val_check_interval"]
    assert all(end % interval == 0 for end in spec_longer.step_ends())  # SampleValidation's own check
