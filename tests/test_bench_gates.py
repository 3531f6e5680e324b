"""The prompt-gate benchmark (benchmarks/bench_gates.py) on a toy config: its variants are what they say (the held
one skips the terms, the live one computes them, the encoder one reads the gate encoder too) and its row reaches `make bench`'s verdicts. Speed is not asserted."""

from __future__ import annotations

from benchmarks.bench_gates import VARIANTS, build, gate_costs
from benchmarks.bench_model import BenchConfig
from benchmarks.goals import rows

TOY = BenchConfig("toy", width=32, heads=2, double_layers=1, single_layers=1, rank=4, batch=2, grid=4,
                  text_tokens=8, rounds=1, warmup=0)


def test_the_variants_skip_or_compute_the_prompt_terms():
    models = {kind: build(kind, TOY) for kind in VARIANTS}
    live = {kind: m.prompt_gates_live() for kind, m in models.items()}
    assert live == {"no_prompt": False, "held": False, "live": True, "encoder": True}
    assert [kind for kind, m in models.items() if m.gate_image_encoder is not None] == ["encoder"]


def test_gate_costs_report_both_ratios_and_reach_the_verdicts():
    res = gate_costs(TOY)
    assert set(res["step_s"]) == set(VARIANTS) and all(t > 0 for t in res["step_s"].values())
    (row,) = rows({"gates": [res]})
    assert row.goal == "<= 1.02" and row.value == res["held_over_no_prompt"]
    assert res["encoder_over_live"] == res["step_s"]["encoder"] / res["step_s"]["live"]
