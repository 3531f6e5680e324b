"""The goals of `make bench` and the verdict of every measured row (one place for the printout and the docs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Row:
    what: str
    measured: str
    value: float | None = None
    goal: str = ""  # e.g. "<= 1.10"; empty: no goal, the row is information

    @property
    def verdict(self) -> str:
        if not self.goal or self.value is None:
            return "no goal"
        op, bound = self.goal.split()
        bound = float(bound.rstrip("x"))
        met = self.value <= bound if op == "<=" else self.value >= bound
        return "met" if met else "NOT MET"


def rows(results: dict[str, Any]) -> list[Row]:
    """One row per measured figure of a `make bench` results file."""
    out: list[Row] = []
    for m in results.get("model", []):
        out.append(Row(f"training step, PRW (5 experts + router) / one always-on LoRA of the same rank, "
                       f"{m['config']}", f"{m['prw_over_lora']:.3f}", m["prw_over_lora"], "<= 1.10"))
    for g in results.get("gates", []):
        out.append(Row(f"training step, prompt gate terms held at zero (skipped) / no prompt gates, {g['config']}",
                       f"{g['held_over_no_prompt']:.3f} (computed: {g['live_over_no_prompt']:.3f})",
                       g["held_over_no_prompt"], "<= 1.02"))
    data = results.get("data")
    if data:
        out.append(Row("data loader (2 workers) / what training consumes",
                       f"{data['loader']['samples_per_s']:.0f} vs {data['training']['samples_per_s']:.1f} samples/s: "
                       f"{data['ratio']:.1f}x", data["ratio"], ">= 5x"))
    for s in results.get("sampler", []):
        routing = f"time-aware routing ({s['timestep_bins']} bins)" if s["timestep_bins"] else "time-independent routing"
        out.append(Row(f"sampler, 28 steps, condition cache on vs off, {s['config']}, {routing}",
                       f"{s['speedup']:.2f}x (cache hit rate {s['cache_hit_rate']:.2f})", s["speedup"],
                       ">= 1.8x" if s["config"] == "wide" else ""))
    for name, r in (results.get("recipes") or {}).items():
        out.append(Row(f"recipe conversion on fixtures, {name}", f"{r['rows_per_s']:.0f} rows/s"))
    v = results.get("validation")
    if v:
        mean = sum(v["seconds_per_task"].values()) / len(v["seconds_per_task"])
        out.append(Row(f"sampling validation of one task ({v['probes']} probes, {v['steps']} steps) / a training "
                       "step (batch 8)", f"{mean:.1f} s vs {v['train_step_s']:.2f} s: "
                       f"{mean / v['train_step_s']:.0f} steps"))
    conditions = results.get("conditions") or {}
    for c in conditions.get("speed", []):
        k = max(c["train_ratio"], key=int)  # the most conditions measured
        train, tokens = c["train_ratio"][k], c["token_ratio"][k]
        out.append(Row(f"training step with {k} conditions / 1 condition, over the token ratio ({tokens:.2f}x), "
                       f"{c['config']}", f"{train:.2f}x: {train / tokens:.2f} of linear", train / tokens, "<= 1.0"))
        out.append(Row(f"denoising step with the condition cache: the most one added condition costs, {c['config']}",
                       f"{100 * c['added_condition_per_step']:+.0f}%", 1 + c["added_condition_per_step"],
                       "<= 1.15x" if c["config"] == "wide" else ""))
    return out


def print_verdicts(results: dict[str, Any]) -> list[Row]:
    table = rows(results)
    width = max((len(r.what) for r in table), default=0)
    print("\nverdicts:")
    for r in table:
        print(f"  {r.what:<{width}}  {r.measured:<40}  {r.goal or '':<8}  {r.verdict}")
    return table
