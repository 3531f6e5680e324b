"""The curriculum spec: the shipped configs are consistent, and invalid specs fail with one line naming the field."""

from pathlib import Path

import pytest
import yaml

from cologen.curriculum.spec import CurriculumSpec, CurriculumStep

ROOT = Path(__file__).resolve().parents[1]


def load_spec(*files: str) -> CurriculumSpec:
    merged: dict = {}
    for f in files:
        spec = yaml.safe_load((ROOT / f).read_text()).get("curriculum", {}).get("spec", {})
        merged.update(spec)
    steps = [CurriculumStep(**s) for s in merged.get("steps", [])]
    return CurriculumSpec(steps=steps, run_steps=merged.get("run_steps"))


def validation_interval() -> int:
    """The tiny curriculum's validation interval: every step's end must fall on one (SampleValidation samples there)."""
    return yaml.safe_load((ROOT / "experiments/tiny/curriculum.yaml").read_text())["trainer"]["val_check_interval"]


def test_tiny_curriculum_and_stages_cover_the_five_steps_once():
    full = load_spec("experiments/tiny/curriculum.yaml")
    full.validate(num_experts=5)
    assert [s.name for s in full.steps] == ["inpainting", "grounding", "control", "customized", "editing"]
    assert [s.stage for s in full.steps] == [1, 1, 2, 3, 3]
    assert (full.steps[0].rho, full.steps[0].alpha) == (1.0, 0.0)
    # with replay, rho is the new task's share of the batch (more would send replayed samples to the newest expert)
    assert all((s.rho, s.alpha) == (s.mixture[s.name], 0.5) for s in full.steps[1:])
    paper = load_spec("experiments/flux_dev/curriculum.yaml")  # no replay: the paper's rho
    assert all((s.rho, s.alpha, s.mixture) == (0.8, 0.5, {s.name: 1.0}) for s in paper.steps[1:])
    covered = []
    for stage in ("stage1", "stage2", "stage3"):
        spec = load_spec("experiments/tiny/curriculum.yaml", f"experiments/tiny/{stage}.yaml")
        spec.validate(num_experts=5)
        covered += spec.selected()
    assert covered == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("baseline", ["cotrain", "no_pretrain"])
def test_ablation_baselines_have_the_curriculum_budget(baseline):
    """Same budget, and each step ends on a validation (SampleValidation samples there and refuses a run that
    would miss one: a 2,100-step split of 4,200 against validation every 200 steps failed at setup)."""
    full = load_spec("experiments/tiny/curriculum.yaml")
    spec = load_spec("experiments/tiny/curriculum.yaml", f"experiments/tiny/{baseline}.yaml")
    spec.validate(num_experts=5)
    assert spec.total_steps() == full.total_steps()
    interval = validation_interval()
    assert [end % interval for end in spec.step_ends()] == [0] * len(spec.steps), spec.step_ends()


def test_customized_step_file_is_the_curriculums_customized_step_alone_and_longer():
    """experiments/tiny/customized_step.yaml (docs/findings.md, "Why customized learns less inside the curriculum"):
    the curriculum's steps before customized unchanged (stage 2's checkpoint holds their experts), customized's step
    2,000 steps of customized alone with no veteran loss, and only that step run, ending on a validation."""
    full = load_spec("experiments/tiny/curriculum.yaml")
    spec = load_spec("experiments/tiny/curriculum.yaml", "experiments/tiny/customized_step.yaml")
    spec.validate(num_experts=5)
    assert spec.steps[:3] == full.steps[:3] and spec.steps[4] == full.steps[4]
    ours = spec.steps[3]
    assert (ours.name, ours.mixture, ours.steps, ours.rho, ours.alpha) == ("customized", {"customized": 1.0}, 2000, 1.0, 0.0)
    assert ours.lr == full.steps[3].lr and spec.run_steps == [3]
    interval = validation_interval()
    assert [end % interval for end in spec.step_ends()] == [0]


def test_step_ends_count_the_selected_steps_from_the_run_start():
    spec = CurriculumSpec([step(steps=400), step(steps=2000), step(steps=600)])
    assert spec.step_ends() == [400, 2400, 3000]
    assert CurriculumSpec(spec.steps, run_steps=[1, 2]).step_ends() == [2000, 2600]


def step(**kw):
    base = dict(name="s", mixture={"inpainting": 1.0}, steps=10)
    base.update(kw)
    return CurriculumStep(**base)


@pytest.mark.parametrize(("spec", "experts", "message"), [
    (CurriculumSpec([step(mixture={"painting": 1.0})]), 5, r"curriculum\.steps\[0\] \(s\)\.mixture has unknown task 'painting'"),
    (CurriculumSpec([step()] * 3), 2, r"curriculum\.steps has 3 steps but model\.prw\.num_experts is 2"),
    (CurriculumSpec([step(), step(steps=0)]), 5, r"curriculum\.steps\[1\] \(s\)\.steps must be > 0"),
    (CurriculumSpec([step(mixture={"inpainting": 0.0, "grounding": 0.0})]), 5,
     r"curriculum\.steps\[0\] \(s\)\.mixture weights must sum to a positive number"),
    (CurriculumSpec([step(mixture={"inpainting": -1.0})]), 5, r"mixture\[inpainting\] is negative"),
    (CurriculumSpec([step(rho=1.5)]), 5, r"curriculum\.steps\[0\] \(s\)\.rho must be in \[0, 1\]"),
    (CurriculumSpec([step(), step()], run_steps=[1, 0]), 5, r"run_steps \[1, 0\] must be consecutive"),
    (CurriculumSpec([step()], run_steps=[3]), 5, r"run_steps \[3\] must index curriculum\.steps"),
    (CurriculumSpec([]), 5, r"curriculum\.steps is empty"),
])
def test_invalid_specs_fail_with_one_line_naming_the_field(spec, experts, message):
    with pytest.raises(ValueError, match=message) as err:
        spec.validate(num_experts=experts)
    assert "\n" not in str(err.value)


def test_a_mixture_task_without_shards_is_refused():
    with pytest.raises(ValueError, match=r"uses 'grounding' but the data has no train_shards"):
        CurriculumSpec([step(mixture={"grounding": 1.0})]).validate(5, available_tasks=["inpainting"])
