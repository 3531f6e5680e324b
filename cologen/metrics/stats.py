"""Means with bootstrap confidence intervals, over probes and over seeds.

Scores come per probe and per run (seed). The interval resamples the runs with replacement and, within each
chosen run, its probes with replacement (a two-level bootstrap), so it covers both the probe sample and the
seed-to-seed spread; with one run it is the usual percentile bootstrap over probes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float
    n: int  # finite values behind the mean

    def format(self, digits: int = 2) -> str:
        if not math.isfinite(self.mean):
            return "n/a"
        if not math.isfinite(self.low):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {max(self.high - self.mean, self.mean - self.low):.{digits}f}"

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}


def _finite(values: Sequence[float]) -> np.ndarray:
    return np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)


def bootstrap_ci(runs: Sequence[Sequence[float]], level: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> Estimate:
    """Mean of all finite values of `runs` (a list of per-probe score lists, one per run) and its `level`
    percentile interval by the two-level bootstrap. NaN interval when fewer than 2 values."""
    groups = [g for g in (_finite(r) for r in runs) if len(g)]
    n = sum(len(g) for g in groups)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    mean = float(np.concatenate(groups).mean())
    if n < 2:
        return Estimate(mean, float("nan"), float("nan"), n)
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for k in range(resamples):
        chosen = rng.integers(0, len(groups), len(groups)) if len(groups) > 1 else [0]
        total = count = 0.0
        for g in chosen:
            values = groups[g]
            sample = values[rng.integers(0, len(values), len(values))]
            total += sample.sum()
            count += len(values)
        stats[k] = total / count
    alpha = (1 - level) / 2
    return Estimate(mean, float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha)), n)
