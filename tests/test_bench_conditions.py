"""The multi-condition benchmark (benchmarks/bench_conditions.py) on a toy config: it measures K = 1, 2, 3 and the
memory plan counts each condition's activations; its rows reach `make bench`'s verdicts. Speed is not asserted."""

from __future__ import annotations

import pytest

from benchmarks.bench_conditions import COUNTS, condition_costs, memory_by_conditions
from benchmarks.bench_model import BenchConfig
from benchmarks.goals import rows
from cologen.testing.flux import TINY_TRANSFORMER


def test_condition_costs_report_every_count_against_one():
    cfg = BenchConfig("toy", width=32, heads=2, double_layers=1, single_layers=1, rank=4, batch=2, grid=4,
                      text_tokens=8, rounds=1, warmup=0)
    res = condition_costs(cfg, sampler_steps=2)
    for key in ("train_ratio", "token_ratio", "denoise_ratio", "request_s"):
        assert sorted(res[key], key=int) == [str(k) for k in COUNTS]
    assert res["train_ratio"]["1"] == res["denoise_ratio"]["1"] == 1.0
    assert res["token_ratio"] == {"1": 1.0, "2": 1.5, "3": 2.0}
    measured = rows({"conditions": {"speed": [res]}})
    assert [r.what.split(",")[0] for r in measured] == ["training step with 3 conditions / 1 condition",
                                                       "denoising step with the condition cache: the most one added "
                                                       "condition costs"]


def test_the_memory_plan_counts_each_condition():
    config = {**TINY_TRANSFORMER, "axes_dims_rope": list(TINY_TRANSFORMER["axes_dims_rope"])}
    memory = memory_by_conditions((1, 2, 3), config=config, grid=4, text_tokens=8)
    full = [memory[k]["activations_gb"] for k in (1, 2, 3)]
    ckpt = [memory[k]["activations_checkpointed_gb"] for k in (1, 2, 3)]
    assert full[0] < full[1] < full[2] and ckpt[0] < ckpt[1] < ckpt[2]
    assert full[2] - full[1] == pytest.approx(full[1] - full[0], rel=0.05)  # each condition adds as much
    assert len({m["persistent_gb"] for m in memory.values()}) == 1  # weights do not depend on the conditions
